"""Which implementation of an op runs, and how its Pallas kernel runs: the
one place for the ``implementation=`` choice, the platform test and
``interpret=``.

Ops take ``implementation="auto" | "xla" | ...``; ``choose`` validates it and
resolves ``"auto"`` per platform. A Pallas kernel runs compiled on GPU/TPU
and in interpret mode on CPU, where ``LEPTON_PALLAS_BACKEND`` (``gpu`` or
``tpu``) picks which kernel family is interpreted (``kernel_target``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import jax

KERNEL_BACKENDS = ("gpu", "tpu")


def platform() -> str:
    """``"gpu"`` (CUDA or ROCm), ``"tpu"`` or ``"cpu"``: the default backend's kind."""
    name = jax.default_backend()
    if name in ("gpu", "cuda", "rocm"):
        return "gpu"
    return "tpu" if name == "tpu" else "cpu"


def choose(op: str, implementation: str, choices: Sequence[str], auto: Mapping[str, str]) -> str:
    """``implementation`` checked against ``choices`` (``"auto"`` included), with
    ``"auto"`` resolved by ``auto[platform()]``; a ValueError naming ``op`` otherwise."""
    if implementation not in choices:
        raise ValueError(f"{op}: implementation must be one of {tuple(choices)}, got {implementation!r}")
    return auto[platform()] if implementation == "auto" else implementation


@dataclasses.dataclass(frozen=True)
class KernelTarget:
    """How a Pallas kernel runs here: which family (``"gpu"`` Triton or
    ``"tpu"`` Mosaic) and whether interpreted (on CPU)."""

    backend: str
    interpret: bool


def kernel_backend() -> str:
    """The kernel family: the platform's on GPU/TPU, else ``LEPTON_PALLAS_BACKEND``
    (``gpu`` by default) for interpret mode."""
    if platform() != "cpu":
        return platform()
    backend = os.environ.get("LEPTON_PALLAS_BACKEND", "gpu").lower()
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"LEPTON_PALLAS_BACKEND must be one of {KERNEL_BACKENDS}, got {backend!r}")
    return backend


def kernel_target(backend: str | None = None, interpret: bool | None = None) -> KernelTarget:
    """The defaults for a kernel call, each overridable (``interpret=False``
    on CPU lowers for another platform, e.g. ``lowering_platforms=("tpu",)``)."""
    return KernelTarget(backend=backend or kernel_backend(),
                        interpret=platform() == "cpu" if interpret is None else interpret)


__all__ = ["KERNEL_BACKENDS", "KernelTarget", "choose", "kernel_backend", "kernel_target", "platform"]
