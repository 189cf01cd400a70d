"""Hugging Face model directories in and out, and converted checkpoints.

``from_hf(dir)`` reads a local directory (``config.json``, ``model.safetensors``
or a sharded ``model.safetensors.index.json``, ``tokenizer.json``) with no
network; ``to_hf`` writes one that ``transformers`` loads. ``save_checkpoint``
/ ``load`` keep a converted model as an ordinary lepton_jax (Orbax)
checkpoint directory, with the ``config.json`` in its ``extra`` and the
tokenizer files beside the steps.

Every tensor is accounted for: a missing one, an unexpected one or a shape
that disagrees with ``config.json`` is an error naming the tensor; only the
family's known buffers (e.g. ``embeddings.position_ids``) are skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from typing import Any, Iterator, Mapping

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lepton_jax.checkpoint.safetensors_io import flatten, unflatten
from lepton_jax.convert.families import Family, Tensor, family_for, family_of

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_DIR = "tokenizer"  # in a converted checkpoint directory
EXTRA_KEY = "hf"  # the converted checkpoint's extra: {"hf": {"family": ..., "config": config.json}}


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face model directory."""
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"from_hf: {os.fspath(directory)!r} has no {CONFIG_FILE} (not a Hugging Face model "
                                "directory)")
    with open(path) as file:
        return json.load(file)


@contextlib.contextmanager
def _open_tensors(directory: str) -> Iterator[dict[str, Any]]:
    """``{name: open safetensors file holding it}`` for a single or sharded checkpoint."""
    single, index = os.path.join(directory, WEIGHTS_FILE), os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as file:
            weight_map = json.load(file)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
        weight_map, files = None, [WEIGHTS_FILE]
    else:
        raise FileNotFoundError(f"from_hf: {directory!r} has neither {WEIGHTS_FILE} nor {INDEX_FILE} "
                                "(PyTorch .bin checkpoints are not read; save with safetensors)")
    with contextlib.ExitStack() as stack:
        handles = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"from_hf: {INDEX_FILE} names the shard {name!r}, which is missing")
            handles[name] = stack.enter_context(safe_open(path, framework="np"))
        by_tensor = {}
        for name, handle in handles.items():
            for tensor in handle.keys():
                if weight_map is not None and weight_map.get(tensor) != name:
                    raise ValueError(f"from_hf: tensor {tensor!r} is in shard {name!r} but {INDEX_FILE} "
                                     f"maps it to {weight_map.get(tensor)!r}")
                by_tensor[tensor] = handle
        yield by_tensor


def _strip(name: str, family: Family) -> str:
    for prefix in (family.prefix, *family.read_prefixes):
        if prefix and name.startswith(prefix):
            return name[len(prefix):]
    return name


def _check_names(family: Family, specs: Mapping[str, Tensor], found: Mapping[str, Any], where: str) -> None:
    ignored = re.compile(family.ignored)
    unexpected = sorted(n for n in found if n not in specs and not ignored.search(n))
    missing = sorted(n for n in specs if n not in found)
    if unexpected:
        shapes = ", ".join(f"{found[n][0]!r} {tuple(found[n][1].get_slice(found[n][0]).get_shape())}"
                           for n in unexpected[:5])
        raise ValueError(f"{where}: unexpected tensor(s) for a {family.name} model: {shapes}"
                         f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)")
    if missing:
        listed = ", ".join(f"{n!r} {specs[n].hf_shape}" for n in missing[:5])
        raise ValueError(f"{where}: missing tensor(s) for a {family.name} model: {listed}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")


def _expected_params(model: linen.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Our params' shapes and their logical axes, from the shapes alone."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)["params"]
    axes = flatten(linen.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return flatten(linen.meta.unbox(boxed)), axes


def _check_mapping(family: Family, model: linen.Module, specs: list[Tensor], where: str) -> dict[str, Any]:
    """The family fills every parameter the model has, and nothing else (no parameter is left random)."""
    expected, axes = _expected_params(model)
    paths = {s.path for s in specs}
    if paths != set(expected):
        raise ValueError(f"{where}: the {family.name} mapping does not cover the model's parameters: "
                         f"unmapped {sorted(set(expected) - paths)[:5]}, unknown {sorted(paths - set(expected))[:5]}")
    return {path: (expected[path].shape, axes[path]) for path in expected}


def _place(array: np.ndarray, names: Any, mesh: Any, rules: Any) -> jax.Array:
    if mesh is None:
        return jnp.asarray(array)
    from lepton_jax.parallel.rules import logical_sharding

    return jax.device_put(array, logical_sharding(tuple(names), mesh, rules))


def _cast(array: np.ndarray, dtype: Any) -> np.ndarray:
    if dtype is None or not np.issubdtype(array.dtype, np.floating) and array.dtype != jnp.bfloat16:
        return array
    return array.astype(jnp.dtype(dtype))


def _with_overrides(model: linen.Module, overrides: Mapping[str, Any] | None) -> linen.Module:
    if not overrides:
        return model
    return model.clone(config=dataclasses.replace(model.config, **dict(overrides)))


def from_hf(directory: str | os.PathLike, *, dtype: Any = None, mesh: Any = None, rules: Any = "fsdp",
            model_overrides: Mapping[str, Any] | None = None) -> tuple[linen.Module, dict[str, Any], Any]:
    """Reads a local Hugging Face model directory.

    Args:
      directory: holds ``config.json``, ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json``) and optionally ``tokenizer.json``.
      dtype: cast floating weights (e.g. ``jnp.float32`` to fine-tune a bf16
        checkpoint); ``None`` keeps the file's dtype.
      mesh, rules: place each parameter straight onto ``mesh``, sharded by the
        logical rules (tensor by tensor: a model larger than one device loads).
      model_overrides: config fields replaced after reading (e.g.
        ``{"attention_implementation": "pallas", "remat": True}``).

    Returns ``(model, variables, tokenizer)``: ``model.apply(variables, ids
    [B, T])`` gives logits ``[B, T, vocab]`` for a decoder, last hidden states
    ``[B, T, D]`` for an encoder; ``tokenizer`` is a
    ``lepton_jax.data.HFTokenizer`` or ``None`` when the directory has none.
    """
    directory = os.fspath(directory)
    where = f"from_hf({directory!r})"
    hf_config = read_config(directory)
    family = family_for(hf_config, where)
    params = {}
    with _open_tensors(directory) as handles:
        found = {_strip(name, family): (name, handle) for name, handle in handles.items()}
        model = _with_overrides(family.build(family.complete_config(hf_config, found.keys())), model_overrides)
        specs = family.tensors(model)
        ours = _check_mapping(family, model, specs, where)
        _check_names(family, {s.hf_name: s for s in specs}, found, where)
        for spec in specs:
            name, handle = found[spec.hf_name]
            shape = tuple(handle.get_slice(name).get_shape())
            if shape != spec.hf_shape:
                raise ValueError(f"{where}: tensor {name!r} has shape {shape} but config.json gives {spec.hf_shape}")
            array = _cast(spec.read(handle.get_tensor(name)), dtype)
            if array.shape != ours[spec.path][0]:
                raise ValueError(f"{where}: tensor {name!r} gives {spec.path!r} the shape {array.shape}, the model "
                                 f"expects {ours[spec.path][0]}")
            params[spec.path] = _place(array, ours[spec.path][1], mesh, rules)
    return model, {"params": unflatten(params)}, load_tokenizer(directory)


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """The ``tokenizer.json`` of ``directory`` as an ``HFTokenizer``, or ``None``."""
    path = os.path.join(os.fspath(directory), "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from lepton_jax.data.tokenizers import HFTokenizer

    return HFTokenizer(path)


def hf_tensors(model: linen.Module, variables: Mapping[str, Any], *, dtype: Any = None,
               where: str = "to_hf") -> dict[str, np.ndarray]:
    """Our params as the family's named tensors (prefixed, Hugging Face layouts)."""
    family = family_of(model, where)
    params = variables.get("params", variables) if isinstance(variables, Mapping) else variables
    flat = {path: np.asarray(x) for path, x in flatten(params).items()}
    specs = family.tensors(model)
    paths = {s.path for s in specs}
    if set(flat) != paths:
        raise ValueError(f"{where}: the params do not match a {family.name} model: not in the model "
                         f"{sorted(set(flat) - paths)[:5]} (merge LoRA adapters first), missing "
                         f"{sorted(paths - set(flat))[:5]}")
    parts: dict[str, list[tuple[int, np.ndarray]]] = {}
    for spec in specs:
        parts.setdefault(spec.hf_name, []).append((spec.part[0] if spec.part else 0, spec.to_hf(flat[spec.path])))
    tensors = {}
    for spec in specs:
        if family.prefix + spec.hf_name in tensors:
            continue
        pieces = [array for _, array in sorted(parts[spec.hf_name], key=lambda p: p[0])]
        array = np.ascontiguousarray(_cast(np.concatenate(pieces, axis=-1) if len(pieces) > 1 else pieces[0], dtype))
        if array.shape != spec.hf_shape:
            raise ValueError(f"{where}: {spec.path!r} gives {spec.hf_name!r} the shape {array.shape}, "
                             f"expected {spec.hf_shape}")
        tensors[family.prefix + spec.hf_name] = array
    return tensors


def to_hf(model: linen.Module, variables: Mapping[str, Any], out_dir: str | os.PathLike, *, tokenizer: Any = None,
          dtype: Any = None, base_config: Mapping[str, Any] | None = None) -> str:
    """Writes ``out_dir`` (``config.json``, ``model.safetensors``, the tokenizer
    files) for ``transformers``' ``from_pretrained``.

    ``tokenizer``: an ``HFTokenizer`` or a directory whose tokenizer files are
    copied; ``base_config``: the original ``config.json``, whose keys we do
    not own (token ids, ...) are kept; ``dtype``: cast floating weights.
    """
    out_dir = os.fspath(out_dir)
    family = family_of(model, "to_hf")
    tensors = hf_tensors(model, variables, dtype=dtype)
    os.makedirs(out_dir, exist_ok=True)
    dtypes = {str(a.dtype) for a in tensors.values()}
    config = {**dict(base_config or {}), **family.hf_config(model), "architectures": [family.architecture],
              "dtype": "bfloat16" if "bfloat16" in dtypes else "float32"}
    config.pop("torch_dtype", None)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as file:
        json.dump(config, file, indent=2, sort_keys=True)
    # transformers reads only safetensors files whose header says "pt".
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        copy_tokenizer(tokenizer, out_dir)
    return out_dir


def copy_tokenizer(tokenizer: Any, out_dir: str) -> None:
    """Copies the tokenizer files beside ``tokenizer`` (an ``HFTokenizer`` or a directory) into ``out_dir``."""
    source = os.path.dirname(tokenizer.path) if hasattr(tokenizer, "path") else os.fspath(tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))


# -- converted checkpoints ------------------------------------------------------


def save_checkpoint(model: linen.Module, variables: Mapping[str, Any], out_dir: str | os.PathLike, *,
                    tokenizer: Any = None, base_config: Mapping[str, Any] | None = None, step: int = 0) -> str:
    """``variables`` as an ordinary lepton_jax checkpoint (``{"params": ...}``
    at ``step``, with the logical axes for re-sharding) that ``load``,
    ``checkpoint.restore``, ``lepton-jax ckpt`` and plain Orbax read."""
    from lepton_jax.checkpoint import CheckpointManager

    out_dir = os.path.abspath(os.fspath(out_dir))
    family = family_of(model, "save_checkpoint")
    hf_config = {**dict(base_config or {}), **family.hf_config(model), "architectures": [family.architecture]}
    params = variables.get("params", variables)
    _, axes = _expected_params(model)
    logical_axes = unflatten({path: tuple(names) for path, names in axes.items()})
    with CheckpointManager(out_dir, async_save=False) as manager:
        manager.save(step, {"params": params}, extra={EXTRA_KEY: {"family": family.name, "config": hf_config}},
                     force=True, logical_axes=logical_axes)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, os.path.join(out_dir, TOKENIZER_DIR))
    return out_dir


def is_hf_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face model directory (has ``config.json``)."""
    return os.path.isfile(os.path.join(os.fspath(path), CONFIG_FILE))


def checkpoint_config(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The ``config.json`` stored in a converted checkpoint's extra."""
    from lepton_jax.checkpoint import CheckpointManager

    with CheckpointManager(directory, async_save=False) as manager:
        extra = manager.extra(step)
    if not extra or EXTRA_KEY not in extra:
        raise ValueError(f"load: {os.fspath(directory)!r} is not a converted checkpoint (its extra has no "
                         f"{EXTRA_KEY!r}; write one with `lepton-jax convert --from-hf`)")
    return dict(extra[EXTRA_KEY]["config"])


def load(path: str | os.PathLike, *, step: int | None = None, dtype: Any = None, mesh: Any = None,
         rules: Any = "fsdp", model_overrides: Mapping[str, Any] | None = None) -> tuple[linen.Module, dict, Any]:
    """``from_hf`` for a Hugging Face directory, or the same triple from a
    checkpoint ``save_checkpoint`` (``lepton-jax convert --from-hf``) wrote."""
    path = os.fspath(path)
    if is_hf_dir(path):
        return from_hf(path, dtype=dtype, mesh=mesh, rules=rules, model_overrides=model_overrides)
    from lepton_jax.checkpoint import restore

    hf_config = checkpoint_config(path, step)
    family = family_for(hf_config, f"load({path!r})")
    model = _with_overrides(family.build(hf_config), model_overrides)
    params = restore(path, step, params_only=True, mesh=mesh, rules=rules if mesh is not None else None, dtype=dtype)
    _check_mapping(family, model, family.tensors(model), f"load({path!r})")
    return model, {"params": params}, load_tokenizer(os.path.join(path, TOKENIZER_DIR))
