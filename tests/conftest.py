"""Every test process sees 8 CPU devices, so SPMD tests can build real meshes.

Set before anything imports jax; unsharded code still runs on device 0.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
