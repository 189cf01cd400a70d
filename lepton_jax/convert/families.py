"""How a Hugging Face architecture maps onto a lepton_jax model.

A ``Family`` turns a ``config.json`` into a model, lists every tensor the
checkpoint must hold (``Tensor``: its Hugging Face name and shape, where it
goes in our params and how its layout changes on the way), and writes the
model's ``config.json`` back. ``hf.py`` does the reading, the checks and
the writing once for every family.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Collection, Mapping

import flax.linen as linen
import numpy as np

Array = np.ndarray
# Modules defining a ``FAMILY``; ``family_for`` imports them on first use.
FAMILY_MODULES = ("gpt2", "llama", "bert")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor: ``hf_name`` (without the family's prefix) with
    shape ``hf_shape`` (from ``config.json``) is our parameter at ``path``
    ('/'-joined) after ``to_ours``; ``to_hf`` is the inverse.

    ``part=(k, n)``: the checkpoint tensor is ``n`` of ours concatenated on
    its last axis (GPT-2's fused ``c_attn``); this one is the ``k``-th.
    """

    hf_name: str
    path: str
    hf_shape: tuple[int, ...]
    to_ours: Callable[[Array], Array] = lambda x: x
    to_hf: Callable[[Array], Array] = lambda x: x
    part: tuple[int, int] | None = None

    def read(self, array: Array) -> Array:
        """Our parameter from the checkpoint tensor."""
        if self.part is not None:
            k, n = self.part
            width = array.shape[-1] // n
            array = array[..., k * width:(k + 1) * width]
        return self.to_ours(array)


def linear_in(shape: tuple[int, ...]) -> tuple[Callable[[Array], Array], Callable[[Array], Array]]:
    """A Linear weight ``[out, in]`` as a kernel whose input is the first axis
    (``[E, H, D]``, ``[E, F]``): ``W.T`` reshaped to ``shape``, and back."""
    return (lambda w: w.T.reshape(shape)), (lambda w: w.reshape(shape[0], -1).T)


def linear_out(shape: tuple[int, ...]) -> tuple[Callable[[Array], Array], Callable[[Array], Array]]:
    """A Linear weight ``[out, in]`` as a kernel whose output is the last axis
    (``[H, D, E]``): ``W.T`` reshaped to ``shape``, and back."""
    return (lambda w: w.T.reshape(shape)), (lambda w: w.reshape(-1, shape[-1]).T)


def reshaped(shape: tuple[int, ...]) -> tuple[Callable[[Array], Array], Callable[[Array], Array]]:
    """The same values in another shape (a bias ``[H*D]`` as ``[H, D]``), and back."""
    return (lambda x: x.reshape(shape)), (lambda x: x.reshape(-1))


@dataclasses.dataclass(frozen=True)
class Family:
    """A Hugging Face architecture family.

    ``model_types``: the ``config.json`` ``model_type`` values it reads;
    ``architecture``: what ``to_hf`` writes in ``architectures``;
    ``prefix``: the prefix ``to_hf`` writes before every name (e.g.
    ``"transformer."``); ``read_prefixes``: prefixes stripped when reading
    (a file saved from a model with a head, or from the bare base model);
    ``ignored``: names that are known non-parameter buffers (a regex matched
    against the unprefixed name), skipped on reading; ``complete_config``:
    ``config.json`` completed from the checkpoint's unprefixed tensor names,
    before ``build``, for what the file does not say (BERT's optional pooler).
    """

    name: str
    model_types: tuple[str, ...]
    architecture: str
    build: Callable[[Mapping[str, Any]], linen.Module]
    tensors: Callable[[linen.Module], list[Tensor]]
    hf_config: Callable[[linen.Module], dict[str, Any]]
    owns: Callable[[linen.Module], bool]
    prefix: str = ""
    read_prefixes: tuple[str, ...] = ()
    ignored: str = r"(?!)"
    complete_config: Callable[[Mapping[str, Any], Collection[str]], Mapping[str, Any]] = (
        lambda hf_config, names: hf_config)


def families() -> list[Family]:
    """Every family, in ``FAMILY_MODULES`` order."""
    return [importlib.import_module(f"lepton_jax.convert.{name}").FAMILY for name in FAMILY_MODULES]


def family_for(hf_config: Mapping[str, Any], where: str) -> Family:
    """The family reading a ``config.json``; a clear error for another architecture."""
    model_type = hf_config.get("model_type")
    for family in families():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in families() for t in f.model_types)
    raise ValueError(f"{where}: unsupported architecture model_type={model_type!r} "
                     f"(architectures {hf_config.get('architectures')}); supported model types: {known}")


def family_of(model: linen.Module, where: str) -> Family:
    """The family that writes ``model`` back to a Hugging Face directory."""
    for family in families():
        if family.owns(model):
            return family
    raise ValueError(f"{where}: no Hugging Face family maps a {type(model).__name__} with "
                     f"{getattr(model, 'config', None)}")


def require(hf_config: Mapping[str, Any], key: str, where: str) -> Any:
    """``hf_config[key]``, or an error naming the missing key."""
    if key not in hf_config or hf_config[key] is None:
        raise ValueError(f"{where}: config.json has no {key!r}")
    return hf_config[key]


def unsupported(hf_config: Mapping[str, Any], settings: Mapping[str, Any], where: str) -> None:
    """An error when ``config.json`` sets a key to a value we do not implement
    (``settings``: key -> the values we support)."""
    for key, supported in settings.items():
        value = hf_config.get(key)
        if key in hf_config and value not in supported:
            raise ValueError(f"{where}: config.json {key}={value!r} is not supported (supported: {list(supported)})")
