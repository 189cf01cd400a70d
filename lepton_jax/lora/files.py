"""Adapters on disk, apart from the base: a small folder of two files.

``adapters.safetensors`` holds each ``a``/``b`` under its '/'-joined path
(``block_0/attention/query/a``); ``adapter_config.json`` holds the
``LoRAConfig`` fields and free-form ``metadata`` (e.g. the base model's
folder), so a reader needs neither the training code nor the base.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from safetensors import SafetensorError

from lepton_jax.lora.adapters import LoRAConfig, adapter_pairs

PyTree = Any
ADAPTERS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
_CONFIG_FIELDS = tuple(field.name for field in dataclasses.fields(LoRAConfig))


def save_adapters(directory: str | os.PathLike, adapters: PyTree, config: LoRAConfig, *,
                  metadata: Mapping[str, Any] | None = None) -> None:
    """Writes ``adapters`` and ``config`` (with JSON-serializable
    ``metadata``) to ``directory`` (created if needed; the two files are
    overwritten)."""
    # Imported here: the checkpoint package imports Orbax (seconds), which
    # training and serving with adapters do not need.
    from lepton_jax.checkpoint.safetensors_io import save_safetensors

    _check_rank(adapters, config, "save_adapters")
    record = {**dataclasses.asdict(config), "metadata": dict(metadata or {})}
    try:
        text = json.dumps(record, indent=2, sort_keys=True)
    except TypeError as error:
        raise ValueError(f"save_adapters: metadata must be JSON-serializable, got {metadata!r} ({error})") from None
    os.makedirs(directory, exist_ok=True)
    save_safetensors(jax.device_get(adapters), os.path.join(directory, ADAPTERS_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as file:
        file.write(text + "\n")


def load_adapters(directory: str | os.PathLike) -> tuple[PyTree, LoRAConfig, dict[str, Any]]:
    """``(adapters, config, metadata)`` from a folder ``save_adapters`` wrote;
    the adapters are float32 jax arrays, bit for bit as saved."""
    from lepton_jax.checkpoint.safetensors_io import load_safetensors

    config_path, adapters_path = (os.path.join(directory, name) for name in (CONFIG_FILE, ADAPTERS_FILE))
    for path in (config_path, adapters_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_adapters: {path} not found (a folder written by save_adapters "
                                    f"holds {CONFIG_FILE} and {ADAPTERS_FILE})")
    try:
        with open(config_path) as file:
            record = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"load_adapters: {config_path} is not valid JSON ({error})") from None
    if not isinstance(record, dict) or set(record) != {*_CONFIG_FIELDS, "metadata"}:
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"load_adapters: {config_path} must hold the keys {sorted({*_CONFIG_FIELDS, 'metadata'})}, "
                         f"got {got}")
    try:
        config = LoRAConfig(**{name: record[name] for name in _CONFIG_FIELDS})
    except (TypeError, ValueError) as error:
        raise ValueError(f"load_adapters: {config_path} holds an invalid config: {error}") from None
    try:
        adapters = load_safetensors(adapters_path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"load_adapters: {adapters_path} is not a readable safetensors file ({error})") from None
    adapters = jax.tree.map(jnp.asarray, adapters)
    _check_rank(adapters, config, f"load_adapters: {adapters_path}")
    return adapters, config, dict(record["metadata"])


def _check_rank(adapters: PyTree, config: LoRAConfig, where: str) -> None:
    for name, (a_IxR, b_RxO) in adapter_pairs(adapters, where).items():
        if a_IxR.shape[1] != config.rank or a_IxR.dtype != jnp.float32 or b_RxO.dtype != jnp.float32:
            raise ValueError(f"{where}: adapter {name!r} must be float32 of rank {config.rank}, got a "
                             f"{a_IxR.dtype} {tuple(a_IxR.shape)} and b {b_RxO.dtype} {tuple(b_RxO.shape)}")
