"""SPMD: meshes from config, logical-axis rules, sharded/shard_map/pmap steps."""

from lepton_jax.parallel.mesh import bytes_per_device, describe_mesh, describe_sharding, make_mesh
from lepton_jax.parallel.rules import (
    DATA_PARALLEL,
    FSDP,
    FSDP_TENSOR,
    LOGICAL_AXES,
    PRESETS,
    TENSOR,
    batch_sharding,
    get_rules,
    logical_sharding,
    opt_state_shardings,
    param_shardings,
    restrict_to_mesh,
)
from lepton_jax.parallel.steps import (
    create_sharded_train_state,
    make_pmap_train_step,
    make_shard_map_train_step,
    make_sharded_train_step,
    param_logical_axes,
    replicate,
    shard_batch,
    split_for_pmap,
    state_shardings,
)

__all__ = [
    "DATA_PARALLEL", "FSDP", "FSDP_TENSOR", "LOGICAL_AXES", "PRESETS", "TENSOR", "batch_sharding", "bytes_per_device",
    "create_sharded_train_state", "describe_mesh", "describe_sharding", "get_rules", "logical_sharding", "make_mesh",
    "make_pmap_train_step", "make_shard_map_train_step", "make_sharded_train_step", "opt_state_shardings",
    "param_logical_axes", "param_shardings", "replicate", "restrict_to_mesh", "shard_batch", "split_for_pmap", "state_shardings",
]

from lepton_jax.parallel.distributed import global_batch, initialize, is_main_process  # noqa: E402

__all__ += ["global_batch", "initialize", "is_main_process"]
