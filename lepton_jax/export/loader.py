"""Loads a model directory written by ``export_model``: jax and numpy only.

This file imports nothing from flax or lepton_jax, so a serving process can
load it on its own (``importlib`` by path) without the training stack. A
model directory holds one folder per integer version::

    model_dir/
      1/
        model.jaxexport   # jax.export.Exported.serialize() bytes
        params.npz        # flat arrays keyed by '/'-joined pytree paths
        signature.json    # inputs, outputs, params (paths in flatten order), preprocessing
        metadata.json     # version, created, source, metrics, library versions
      2/ ...
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from lepton_jax.sampling import Sampler, check_sampling

MODEL_FILE = "model.jaxexport"
PARAMS_FILE = "params.npz"
SIGNATURE_FILE = "signature.json"
METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1
BATCH_SYMBOL = "b"
PREPROCESSING_OPS = ("normalize",)


def list_versions(model_dir: str | os.PathLike) -> list[int]:
    """The integer version folders of ``model_dir``, ascending (``[]`` if none)."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(name) for name in os.listdir(model_dir)
                  if name.isdigit() and os.path.isfile(os.path.join(model_dir, name, MODEL_FILE)))


def resolve_version_dir(model_dir: str | os.PathLike, version: int | None = None) -> tuple[str, int]:
    """``(path, version)`` of ``model_dir/<version>`` (default: the latest).

    ``model_dir`` may also be a version folder itself (it holds ``model.jaxexport``).
    """
    model_dir = os.path.abspath(os.fspath(model_dir))
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"load: no such model directory {model_dir!r}")
    if version is None and os.path.isfile(os.path.join(model_dir, MODEL_FILE)):
        with open(os.path.join(model_dir, METADATA_FILE), encoding="utf-8") as f:
            return model_dir, int(json.load(f)["version"])
    versions = list_versions(model_dir)
    if not versions:
        raise FileNotFoundError(f"load: {model_dir!r} holds no exported model versions (folders 1/, 2/, ... "
                                f"with a {MODEL_FILE})")
    if version is None:
        version = versions[-1]
    elif int(version) not in versions:
        raise FileNotFoundError(f"load: {model_dir!r} has no version {version}; versions are {versions}")
    return os.path.join(model_dir, str(int(version))), int(version)


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a dtype name in a model's spec (``"bfloat16"`` included)."""
    return np.dtype(jax.numpy.dtype(name))  # jax knows the ml_dtypes names (bfloat16, float8_*)


def encode_array(x: Any) -> np.ndarray:
    """The array as npz can store it: dtypes numpy lacks (bfloat16, float8) as same-width uints."""
    x = np.asarray(x)
    if np.dtype(x.dtype.str) != x.dtype:  # an ml_dtypes type; npz would write it as raw void bytes
        return x.view(f"uint{8 * x.dtype.itemsize}")
    return x


def decode_array(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Inverse of ``encode_array`` given the recorded dtype name."""
    wanted = numpy_dtype(dtype)
    return stored if stored.dtype == wanted else stored.view(wanted)


class LoadedModel:
    """An exported model, callable as ``model(*inputs) -> outputs``.

    Inputs are numpy arrays (or anything ``np.asarray`` takes) whose leading
    dimension is the batch; outputs are jax arrays with the structure the
    exported function returned. Attributes: ``signature`` and ``metadata``
    (the JSON files), ``version``, ``path``, ``platform`` (where it runs),
    ``exported`` (the ``jax.export.Exported``) and ``params``.
    """

    def __init__(self, path: str, version: int, exported: jax.export.Exported, params: Any,
                 signature: dict[str, Any], metadata: dict[str, Any], device: jax.Device, platform: str) -> None:
        self.path, self.version, self.exported = path, version, exported
        self.signature, self.metadata = signature, metadata
        self.device, self.platform = device, platform
        self.params = jax.device_put(params, device)
        self.input_names = tuple(spec["name"] for spec in signature["inputs"])
        # Compiled once per batch size; the exported module picks the platform from the device.
        self._call = jax.jit(exported.call)

    def __call__(self, *inputs: Any, preprocess: bool = True, **named_inputs: Any) -> Any:
        """Runs the model on ``inputs`` (positional, or by signature name).

        With ``preprocess`` the signature's preprocessing (e.g. normalization)
        is applied first, so raw inputs go in. Raises ``ValueError`` naming the
        input when its dtype, rank or non-batch shape differ from the signature.
        """
        arrays = self.prepare(*inputs, preprocess=preprocess, **named_inputs)
        return self._call(self.params, *(jax.device_put(x, self.device) for x in arrays))

    def prepare(self, *inputs: Any, preprocess: bool = True, **named_inputs: Any) -> list[np.ndarray]:
        """Validates, preprocesses and casts ``inputs`` as ``__call__`` does; returns numpy arrays."""
        arrays = _gather_inputs(self.input_names, inputs, named_inputs)
        batch = None
        prepared = []
        for spec, x in zip(self.signature["inputs"], arrays):
            x = _check_input(spec, x)
            if batch is not None and x.shape[0] != batch[1]:
                raise ValueError(f"LoadedModel: inputs share the batch dimension {BATCH_SYMBOL!r}, but "
                                 f"{batch[0]!r} has {batch[1]} rows and {spec['name']!r} has {x.shape[0]}")
            batch = (spec["name"], x.shape[0])
            if preprocess:
                x = _preprocess(self.signature.get("preprocessing") or {}, spec["name"], self.input_names, x)
            prepared.append(x.astype(numpy_dtype(spec["dtype"]), copy=False))
        return prepared

    @property
    def generator(self) -> "Generator | None":
        """Token-by-token generation with a KV cache, for models exported with a
        decode step (``export_decoder``); ``None`` otherwise."""
        spec = self.signature.get("generation")
        if spec is None:
            return None
        if getattr(self, "_generator", None) is None:
            with open(os.path.join(self.path, spec["file"]), "rb") as f:
                decoder = jax.export.deserialize(bytearray(f.read()))
            self._generator = Generator(decoder, self.params, spec, self.device)
        return self._generator

    def __repr__(self) -> str:
        def describe(specs):
            return ", ".join(f"{s['name']}: {s['dtype']}[{', '.join(map(str, s['shape']))}]" for s in specs)

        return (f"LoadedModel(version={self.version}, platform={self.platform!r}, "
                f"inputs=({describe(self.signature['inputs'])}), outputs=({describe(self.signature['outputs'])}))")


class Generator:
    """Samples tokens one at a time from an exported decode step.

    ``stream(prompt, max_tokens, ...)`` feeds the prompt through the cache,
    then yields each sampled token id as soon as it is drawn.
    """

    def __init__(self, decoder: jax.export.Exported, params: Any, spec: Mapping[str, Any], device: jax.Device) -> None:
        self.spec, self.params, self.device = spec, params, device
        self.max_len, self.vocab_size = int(spec["max_len"]), int(spec["vocab_size"])
        self._decode = jax.jit(decoder.call)

    def empty_cache(self, batch: int = 1) -> list[jax.Array]:
        """A zeroed KV cache for ``batch`` rows, as the decode step takes it (leaves in ``spec["cache"]`` order)."""
        return [jax.device_put(np.zeros([batch if d == BATCH_SYMBOL else d for d in leaf["shape"]],
                                        numpy_dtype(leaf["dtype"])), self.device) for leaf in self.spec["cache"]]

    def step(self, tokens_Bx1: np.ndarray, cache: Sequence[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
        """One decode step: ``(logits [B, vocab], updated cache)`` for one token per row."""
        logits, *cache = self._decode(self.params, tokens_Bx1, *cache)
        return logits, cache

    def check(self, prompt: Sequence[int], max_tokens: int, temperature: float, top_k: int,
              top_p: float = 1.0) -> None:
        """Raises ``ValueError`` naming the argument that cannot be served."""
        if len(prompt) < 1:
            raise ValueError("generate: prompt must hold at least one token")
        if any(not 0 <= int(t) < self.vocab_size for t in prompt):
            raise ValueError(f"generate: prompt tokens must be in [0, {self.vocab_size})")
        if not isinstance(max_tokens, int) or max_tokens < 1 or len(prompt) + max_tokens > self.max_len:
            raise ValueError(f"generate: max_tokens must be an int >= 1 with prompt + max_tokens <= {self.max_len} "
                             f"(the model's context); got prompt {len(prompt)} + max_tokens {max_tokens!r}")
        check_sampling(temperature, top_k, top_p)

    def stream(self, prompt: Sequence[int], max_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0):
        """Yields ``max_tokens`` token ids sampled after ``prompt`` by the
        sampler ``models.generate`` uses (``sampling.Sampler``): greedy at
        ``temperature=0``, ``top_k``/``top_p`` restrict the candidates, and
        the same seed gives the same tokens as ``models.generate``."""
        self.check(prompt, max_tokens, temperature, top_k, top_p)
        sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        cache = self.empty_cache()
        logits = None
        for token in prompt:
            logits, cache = self.step(np.array([[token]], np.int32), cache)
        for _ in range(max_tokens):
            token = int(sampler(logits)[0])  # logits [1, V]
            yield token
            logits, cache = self.step(np.array([[token]], np.int32), cache)


def load(model_dir: str | os.PathLike, version: int | None = None, *, platform: str | None = None) -> LoadedModel:
    """Loads ``model_dir/<version>`` (default: the latest version) for inference.

    Args:
      model_dir: the directory ``export_model`` wrote into (or one version folder).
      version: an integer version; ``None`` picks the largest.
      platform: ``"cpu"``, ``"cuda"``, ``"rocm"`` or ``"tpu"``; ``None`` picks the
        default backend when the model was exported for it, else the first
        exported platform that has a device here.

    Returns:
      A ``LoadedModel``: ``model(*inputs)`` runs the exported function.
    """
    path, version = resolve_version_dir(model_dir, version)
    with open(os.path.join(path, SIGNATURE_FILE), encoding="utf-8") as f:
        signature = json.load(f)
    with open(os.path.join(path, METADATA_FILE), encoding="utf-8") as f:
        metadata = json.load(f)
    if signature.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"load: {path} has format_version {signature['format_version']}; this loader reads up "
                         f"to {FORMAT_VERSION}")
    with open(os.path.join(path, MODEL_FILE), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    params = _load_params(path, signature["params"], exported)
    device, platform = _pick_device(exported.platforms, platform, path)
    return LoadedModel(path, version, exported, params, signature, metadata, device, platform)


# -- helpers ------------------------------------------------------------------


def _load_params(path: str, param_specs: Sequence[Mapping[str, Any]], exported: jax.export.Exported) -> Any:
    # The exported in_tree is ((params, *inputs), {}); its params subtree is
    # the treedef, and signature.json lists the leaves in flatten order.
    params_tree = exported.in_tree.children()[0].children()[0]
    if params_tree.num_leaves != len(param_specs):
        raise ValueError(f"load: {path}/{SIGNATURE_FILE} lists {len(param_specs)} params but the exported "
                         f"function takes {params_tree.num_leaves}")
    with np.load(os.path.join(path, PARAMS_FILE), allow_pickle=False) as stored:
        leaves = []
        for spec in param_specs:
            if spec["path"] not in stored:
                raise ValueError(f"load: {path}/{PARAMS_FILE} has no array {spec['path']!r}")
            leaf = decode_array(stored[spec["path"]], spec["dtype"])
            if list(leaf.shape) != list(spec["shape"]):
                raise ValueError(f"load: param {spec['path']!r} has shape {leaf.shape} in {PARAMS_FILE} but "
                                 f"{tuple(spec['shape'])} in {SIGNATURE_FILE}")
            leaves.append(leaf)
    return jax.tree_util.tree_unflatten(params_tree, leaves)


def _pick_device(exported_platforms: Sequence[str], platform: str | None, path: str) -> tuple[jax.Device, str]:
    if platform is not None:
        candidates = [platform]
    else:
        default = jax.export.default_export_platform()
        candidates = [default] + [p for p in exported_platforms if p != default]
    for candidate in candidates:
        if candidate not in exported_platforms:
            if platform is not None:
                raise ValueError(f"load: platform={platform!r} but {path} was exported for {tuple(exported_platforms)}")
            continue
        try:
            return jax.devices(candidate)[0], candidate
        except RuntimeError:  # no such backend on this machine
            if platform is not None:
                raise ValueError(f"load: platform={platform!r} has no devices here; available backend "
                                 f"{jax.default_backend()!r}") from None
    raise ValueError(f"load: {path} was exported for {tuple(exported_platforms)}, none of which has a device "
                     f"here (default backend {jax.default_backend()!r}); re-export with that platform")


def _gather_inputs(names: Sequence[str], inputs: Sequence[Any], named: Mapping[str, Any]) -> list[Any]:
    if inputs and named:
        raise ValueError("LoadedModel: pass inputs either positionally or by name, not both")
    if named:
        unknown = sorted(set(named) - set(names))
        missing = [n for n in names if n not in named]
        if unknown or missing:
            raise ValueError(f"LoadedModel: expected inputs {list(names)}, got {sorted(named)}")
        return [named[n] for n in names]
    if len(inputs) != len(names):
        raise ValueError(f"LoadedModel: expected {len(names)} inputs {list(names)}, got {len(inputs)}")
    return list(inputs)


def _check_input(spec: Mapping[str, Any], x: Any) -> np.ndarray:
    name, shape, dtype = spec["name"], spec["shape"], numpy_dtype(spec["dtype"])
    x = np.asarray(x)
    expected = f"{spec['dtype']}[{', '.join(map(str, shape))}]"
    got = f"{x.dtype}{list(x.shape)}"
    # same_kind: float64 -> float32 and int64 -> int32 are fine, float -> int is not.
    if x.dtype != dtype and not np.can_cast(x.dtype, dtype, casting="same_kind"):
        raise ValueError(f"LoadedModel: input {name!r} expected dtype {expected}, got {got}")
    if x.ndim != len(shape):
        raise ValueError(f"LoadedModel: input {name!r} expected rank {len(shape)} {expected}, got {got}")
    for axis, (want, have) in enumerate(zip(shape, x.shape)):
        if isinstance(want, int) and want != have:
            raise ValueError(f"LoadedModel: input {name!r} expected shape {expected}, got {got} (axis {axis})")
    if x.shape[0] < 1:
        raise ValueError(f"LoadedModel: input {name!r} needs a batch of at least 1, got {got}")
    return x


def _preprocess(preprocessing: Mapping[str, Any], name: str, input_names: Sequence[str], x: np.ndarray) -> np.ndarray:
    """Applies the signature's preprocessing ops that target input ``name``."""
    for op, args in preprocessing.items():
        target = args.get("input", input_names[0])
        if target != name:
            continue
        if op == "normalize":
            mean = np.asarray(args["mean"], np.float32)
            std = np.asarray(args["std"], np.float32)
            x = (x.astype(np.float32) - mean) / std
        else:
            raise ValueError(f"LoadedModel: unknown preprocessing op {op!r}; this loader knows {PREPROCESSING_OPS}")
    return x
