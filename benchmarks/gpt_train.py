"""GPT-2 124M training step: lepton_jax against the plain Flax + optax peer, in one process.

    # GPU, from the repo root (the device machine's python3 has jax, flax, optax; only files under
    # $OUT come back, so copy the JSON there; the peer file travels only if copied into shared/peers/):
    PYTHONUNBUFFERED=1 python3 -m benchmarks.gpt_train && cp benchmarks/results/gpt_train_*.json $OUT/
    # CPU: tiny shapes, checks the script end to end
    python -m benchmarks.gpt_train --layers 2 --d-model 128 --heads 4 --vocab 512 --seq 64 --batch 2 \\
        --steps 3 --warmup 1 --curve-steps 5 --out /tmp/gpt_train_smoke.json

Both sides train GPT-2 124M (12 layers, 12 heads, d_model 768, d_ff 3072,
vocab 50304, seq 1024, batch 16), bf16 compute and fp32 params, with the
SAME optax transformation and the SAME synthetic token stream:

- ours: ``models.GPT`` (fused linear cross-entropy head, learned positions,
  tied embeddings), ``models.lm_loss`` and ``train.make_train_step(...,
  donate=True)``; ``--attention/--norm/--loss/--remat`` pick its kernels.
- peer: the ``GPT`` of ``../shared/peers/gpt2_flax.py`` (``--peer``), imported
  by path without running its ``main``; its module globals (V, L, H, E, T, B,
  IMPL) are set to this run's shapes, and its step (value_and_grad of the
  mean softmax cross-entropy on fp32 logits, jit donating params and
  optimizer state) is reproduced here with this run's optimizer. The device
  machine gets only the repo, so when no peer file is found (looked for in
  ``../shared/peers`` then ``shared/peers``) a line-for-line copy below
  stands in, and ``peer.source`` in the JSON says which ran.

Optimizer (``--optimizer gpt2``, the default, one transform for both):
``optax.chain(clip_by_global_norm(1.0), adamw(lr, b1=0.9, b2=0.95,
weight_decay=0.1, mask=ndim >= 2))`` with lr 6e-4 under a linear warmup and
cosine decay to lr/10 over the curve steps (``--schedule constant`` holds
it). ``--optimizer peer`` is the peer's own ``optax.adamw(3e-4,
weight_decay=0.1)``, to reproduce its published throughput.

Data: windows of a stream of phrases drawn uniformly from a fixed random
table (1024 phrases of 8 tokens over the first 8192 token ids), so the loss
falls from ln(vocab) towards ln(1024)/8 nats; batch ``i`` depends only on
(seed, i), so both sides see the same tokens.

Per side: ``compile_s`` (lower + compile, ahead of time), ``first_step_s``
(that plus the first step), the loss on each of the first ``--curve-steps``
steps, then after ``--warmup`` more steps the median wall time of
``--steps`` steps each ended by ``block_until_ready`` (on device-resident
batches), and the mean of as many back-to-back steps; tokens/s, MFU =
tokens/s x (6N + 12 L H Dh T) / peak (989 TFLOP/s, H100 dense bf16), the
compiled memory analysis, and the process's ``peak_bytes_in_use``. That
peak never resets, so it is exact only for the first side run (``--sides``
orders them) or when a later side raises it (``peak_bytes_exact``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from types import ModuleType
from typing import Any, Callable

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lepton_jax import models, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_CANDIDATES = (os.path.join(REPO, "..", "shared", "peers", "gpt2_flax.py"),
                   os.path.join(REPO, "shared", "peers", "gpt2_flax.py"))
PEER_GLOBALS = ("V", "L", "H", "E", "T", "B", "IMPL", "GPT")


# --- The peer baseline ----------------------------------------------------------------------------

class _PeerBlockCopy(linen.Module):
    """``Block`` of ../shared/peers/gpt2_flax.py, line for line, its globals as fields."""

    E: int
    H: int
    T: int
    IMPL: str

    @linen.compact
    def __call__(self, x):
        E, H, T, IMPL = self.E, self.H, self.T, self.IMPL
        dt = jnp.bfloat16
        h = linen.LayerNorm(dtype=dt)(x)
        qkv = linen.Dense(3 * E, dtype=dt)(h).reshape(x.shape[0], T, 3, H, E // H)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        a = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=None if IMPL == "auto" else IMPL)
        x = x + linen.Dense(E, dtype=dt)(a.reshape(x.shape[0], T, E))
        h = linen.LayerNorm(dtype=dt)(x)
        h = linen.Dense(E, dtype=dt)(linen.gelu(linen.Dense(4 * E, dtype=dt)(h)))
        return x + h


class _PeerGPTCopy(linen.Module):
    """``GPT`` of ../shared/peers/gpt2_flax.py, line for line; blocks named as
    the original names them, so the parameters and their init are identical."""

    V: int
    L: int
    H: int
    E: int
    T: int
    IMPL: str

    @linen.compact
    def __call__(self, idx):
        V, L, E, T = self.V, self.L, self.E, self.T
        wte = linen.Embed(V, E, dtype=jnp.bfloat16)
        x = wte(idx) + linen.Embed(T, E, dtype=jnp.bfloat16)(jnp.arange(T))[None]
        for i in range(L):
            x = _PeerBlockCopy(E, self.H, T, self.IMPL, name=f"Block_{i}")(x)
        x = linen.LayerNorm(dtype=jnp.bfloat16)(x)
        return wte.attend(x).astype(jnp.float32)


def load_peer(spec: str, shapes: dict[str, int], attention: str) -> tuple[linen.Module, dict[str, Any]]:
    """The peer's ``GPT`` for these shapes and where it came from.

    ``spec``: a path to gpt2_flax.py, ``"auto"`` (the usual places) or
    ``"builtin"`` (the copy above). A path that is missing or does not import
    falls back to the copy with a message on stderr.
    """
    candidates = PEER_CANDIDATES if spec == "auto" else () if spec == "builtin" else (spec,)
    values = {"V": shapes["vocab"], "L": shapes["layers"], "H": shapes["heads"], "E": shapes["d_model"],
              "T": shapes["seq"], "B": shapes["batch"], "IMPL": attention}
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            module = _import_path("gpt2_flax_peer", path)
        except Exception as e:  # noqa: BLE001 - any import failure falls back to the copy
            print(f"gpt_train: could not import the peer {path}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        missing = [name for name in PEER_GLOBALS if not hasattr(module, name)]
        if missing:
            print(f"gpt_train: the peer {path} lacks {missing}; using the built-in copy", file=sys.stderr)
            break
        # The peer's modules read these globals when traced, so setting them resizes it.
        for name, value in values.items():
            setattr(module, name, value)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        return module.GPT(), {"source": os.path.normpath(path), "sha256": digest}
    if spec != "builtin":
        print(f"gpt_train: no peer file at {list(map(os.path.normpath, candidates))}; using the built-in "
              "line-for-line copy of ../shared/peers/gpt2_flax.py (pass --peer PATH to import the original)",
              file=sys.stderr)
    model = _PeerGPTCopy(V=values["V"], L=values["L"], H=values["H"], E=values["E"], T=values["T"], IMPL=attention)
    return model, {"source": "builtin copy of ../shared/peers/gpt2_flax.py", "sha256": None}


def _import_path(name: str, path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module spec for {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- Data and optimizer ---------------------------------------------------------------------------

def make_token_stream(*, seed: int, batch: int, seq: int, data_vocab: int, phrases: int,
                      phrase_len: int) -> Callable[[int], np.ndarray]:
    """``tokens(i) -> int32 [batch, seq + 1]``: windows of a stream of random
    phrases from a fixed table; batch ``i`` depends only on ``(seed, i)``."""
    table_PxN = np.random.default_rng(seed).integers(0, data_vocab, (phrases, phrase_len), dtype=np.int32)
    count = (seq + 1) // phrase_len + 2

    def tokens(i: int) -> np.ndarray:
        rng = np.random.default_rng([seed, i])
        stream_BxM = table_PxN[rng.integers(0, phrases, (batch, count))].reshape(batch, -1)
        start_B = rng.integers(0, phrase_len, batch)
        return np.take_along_axis(stream_BxM, start_B[:, None] + np.arange(seq + 1)[None], axis=1)

    return tokens


def make_optimizer(args: argparse.Namespace) -> tuple[optax.GradientTransformation, dict[str, Any]]:
    """The one optax transformation both sides train with, and its description."""
    if args.optimizer == "peer":
        return optax.adamw(3e-4, weight_decay=0.1), {"name": "optax.adamw(3e-4, weight_decay=0.1) (the peer's own)"}
    warmup = min(args.lr_warmup, args.curve_steps // 5)
    if args.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.curve_steps, warmup + 1),
                                                end_value=args.lr / 10)
    else:
        lr = args.lr
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731 - no decay on biases/norms
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay_mask))
    return tx, {"name": "chain(clip_by_global_norm(1.0), adamw(b1=0.9, b2=0.95, weight_decay=0.1, mask=ndim>=2))",
                "lr": args.lr, "schedule": args.schedule,
                **({"warmup_steps": warmup, "decay_steps": max(args.curve_steps, warmup + 1),
                    "end_lr": args.lr / 10} if args.schedule == "cosine" else {})}


# --- The two sides as (jitted step, carry, batch maker, output splitter) --------------------------

def build_ours(args, tx, example_BxS: np.ndarray):
    config = models.GPTConfig(vocab_size=args.vocab, max_len=args.seq, num_layers=args.layers,
                              num_heads=args.heads, d_model=args.d_model, d_ff=args.d_ff, dtype=jnp.bfloat16,
                              fused_loss=not args.unfused_loss, positions="learned", tie_embeddings=True,
                              attention_implementation=args.attention, norm_implementation=args.norm,
                              remat=args.remat)
    model = models.GPT(config)
    loss_fn = functools.partial(models.lm_loss, implementation=args.loss)
    step = train.make_train_step(model, tx, loss_fn, input_key="inputs", donate=True)
    state = train.create_train_state(model, tx, example_BxS, seed=0)
    to_batch = lambda tok: {"inputs": jax.device_put(tok[:, :-1]), "targets": jax.device_put(tok[:, 1:])}  # noqa: E731
    split = lambda out: ((out[0],), out[1]["loss"])  # noqa: E731
    return step, (state,), to_batch, split, train.count_params(state.params)


def build_peer(model: linen.Module, tx, example_BxS: np.ndarray):
    """The peer's step as its ``main`` writes it, with this run's ``tx``."""
    params = model.init(jax.random.key(1), example_BxS)
    opt = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt, tok):
        def loss_fn(p):
            logits = model.apply(p, tok[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    split = lambda out: ((out[0], out[1]), out[2])  # noqa: E731
    return step, (params, opt), jax.device_put, split, sum(p.size for p in jax.tree.leaves(params))


def _bytes_in_use(key: str) -> int | None:
    stats = jax.devices()[0].memory_stats()
    return int(stats[key]) if stats and key in stats else None


def measure(step, carry: tuple, to_batch, split, tokens: Callable[[int], np.ndarray], args) -> dict[str, Any]:
    """Compiles, trains ``curve_steps`` recording the loss, then times steps."""
    peak_before = _bytes_in_use("peak_bytes_in_use")
    record: dict[str, Any] = {"bytes_in_use_before": _bytes_in_use("bytes_in_use")}
    batch = to_batch(tokens(0))
    start = time.perf_counter()
    compiled = step.lower(*carry, batch).compile()
    record["compile_s"] = time.perf_counter() - start
    memory = compiled.memory_analysis()
    if memory is not None:
        fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                  "generated_code_size_in_bytes")
        record["compiled_memory"] = {f.removesuffix("_size_in_bytes"): int(getattr(memory, f)) for f in fields}
        m = record["compiled_memory"]
        record["compiled_peak_bytes_estimate"] = m["argument"] + m["output"] - m["alias"] + m["temp"]
    start = time.perf_counter()
    carry, loss = split(compiled(*carry, batch))
    jax.block_until_ready((carry, loss))
    record["first_step_s"] = record["compile_s"] + time.perf_counter() - start
    losses = [loss]
    for i in range(1, args.curve_steps):
        carry, loss = split(compiled(*carry, to_batch(tokens(i))))
        losses.append(loss)
    record["curve"] = [float(x) for x in jax.device_get(losses)]

    timing_batches = [to_batch(tokens(args.curve_steps + j)) for j in range(4)]
    for j in range(args.warmup):
        carry, loss = split(compiled(*carry, timing_batches[j % 4]))
    jax.block_until_ready((carry, loss))
    samples = []
    for j in range(args.steps):
        start = time.perf_counter()
        carry, loss = split(compiled(*carry, timing_batches[j % 4]))
        jax.block_until_ready((carry, loss))
        samples.append((time.perf_counter() - start) * 1e3)
    start = time.perf_counter()
    for j in range(args.steps):
        carry, loss = split(compiled(*carry, timing_batches[j % 4]))
    jax.block_until_ready((carry, loss))
    record["step_ms_mean_back_to_back"] = (time.perf_counter() - start) * 1e3 / args.steps
    record["step_ms_median"] = statistics.median(samples)
    record["step_ms_min"], record["step_ms_max"] = min(samples), max(samples)
    record["final_loss"] = float(loss)
    peak = _bytes_in_use("peak_bytes_in_use")
    record["peak_bytes_in_use"] = peak
    record["peak_bytes_exact"] = None if peak is None else bool(not peak_before or peak > peak_before)
    return record


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


# --- Run, report ----------------------------------------------------------------------------------

def _versions() -> dict[str, Any]:
    versions: dict[str, Any] = {"python": sys.version.split()[0]}
    for package in ("jax", "jaxlib", "flax", "optax", "numpy", "jax-cuda13-plugin", "jax-cuda12-plugin"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        versions["platform_version"] = jax.devices()[0].client.platform_version
    except Exception:  # noqa: BLE001 - informational only
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
        versions["lepton_jax_commit"] = commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") or None
    except (OSError, subprocess.SubprocessError):
        versions["lepton_jax_commit"] = None
    return versions


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = jax.devices()[0]
    shapes = {"batch": args.batch, "seq": args.seq, "layers": args.layers, "heads": args.heads,
              "d_model": args.d_model, "d_ff": args.d_ff, "vocab": args.vocab, "head_dim": args.d_model // args.heads,
              "tokens_per_step": args.batch * args.seq}
    peer_attention = args.peer_attention or ("cudnn" if device.platform == "gpu" else "xla")
    tx, optimizer = make_optimizer(args)
    data_vocab = min(args.vocab, args.data_vocab)
    tokens = make_token_stream(seed=args.seed, batch=args.batch, seq=args.seq, data_vocab=data_vocab,
                               phrases=args.phrases, phrase_len=args.phrase_len)
    example_BxS = tokens(0)[:, :-1]
    peak_flops = args.peak_tflops * 1e12
    result: dict[str, Any] = {
        "bench": "gpt_train", "date": datetime.date.today().isoformat(), "device": device.device_kind,
        "platform": device.platform, "num_devices": jax.device_count(), "versions": _versions(),
        "xla_flags": os.environ.get("XLA_FLAGS"), "shapes": shapes,
        "config": {"compute_dtype": "bfloat16", "param_dtype": "float32", "ours": {
                       "attention": args.attention, "norm": args.norm, "loss": args.loss, "remat": args.remat,
                       "fused_loss": not args.unfused_loss, "positions": "learned", "tie_embeddings": True},
                   "peer": {"attention": peer_attention, "d_ff": 4 * args.d_model},
                   "optimizer": optimizer, "seed": args.seed, "peak_flops": peak_flops,
                   "data": {"kind": "random phrase table", "data_vocab": data_vocab, "phrases": args.phrases,
                            "phrase_len": args.phrase_len, "seed": args.seed,
                            "loss_floor_nats": float(np.log(args.phrases) / args.phrase_len)},
                   "steps": {"curve": args.curve_steps, "warmup": args.warmup, "timed": args.steps}},
        "timing_method": ("compile_s: wall time of jit(...).lower(...).compile(); step_ms_median: median wall "
                          "time of --steps steps, each ended by jax.block_until_ready on the new state and loss, "
                          "after the curve steps and --warmup more, on 4 rotating device-resident batches; "
                          "step_ms_mean_back_to_back: mean of --steps steps dispatched back to back"),
        "results": {},
    }
    for side in args.sides.split(","):
        print(f"gpt_train: running {side} ...", file=sys.stderr, flush=True)
        record: dict[str, Any] = {}
        try:
            if side == "ours":
                built = build_ours(args, tx, example_BxS)
            elif side == "peer":
                peer_model, source = load_peer(args.peer, shapes, peer_attention)
                record.update(source)
                built = build_peer(peer_model, tx, example_BxS)
            else:
                raise ValueError(f"gpt_train: --sides takes ours and/or peer, got {side!r}")
            step, carry, to_batch, split, num_params = built
            del built
            flops_per_token = 6 * num_params + 12 * args.layers * args.heads * (args.d_model // args.heads) * args.seq
            record.update(params=int(num_params), flops_per_token=flops_per_token)
            record.update(measure(step, carry, to_batch, split, tokens, args))
            del carry
            record["tokens_per_s"] = shapes["tokens_per_step"] / (record["step_ms_median"] / 1e3)
            record["mfu"] = record["tokens_per_s"] * flops_per_token / peak_flops
        except Exception as e:  # a side that cannot run is recorded, not fatal
            record["error"] = f"{type(e).__name__}: {str(e)[:600]}"
            print(f"gpt_train: {side} failed: {record['error']}", file=sys.stderr)
        result["results"][side] = record
    _compare(result, args)
    return result


def _compare(result: dict[str, Any], args: argparse.Namespace) -> None:
    ours, peer = result["results"].get("ours", {}), result["results"].get("peer", {})
    keys = ("tokens_per_s", "step_ms_median", "mfu", "compile_s", "first_step_s", "peak_bytes_in_use",
            "compiled_peak_bytes_estimate")
    result["ratio_ours_over_peer"] = {k: ours[k] / peer[k] for k in keys if ours.get(k) and peer.get(k)}
    every = args.curve_every
    curves: dict[str, Any] = {"every": every, "smooth_window": args.smooth,
                              "steps": list(range(0, args.curve_steps, every))}
    smoothed = {}
    for name, record in (("ours", ours), ("peer", peer)):
        if "curve" in record:
            raw = record.pop("curve")
            smoothed[name] = smooth(raw, args.smooth)
            curves[name] = raw[::every]
            curves[f"{name}_smoothed"] = smoothed[name][::every]
            curves[f"{name}_smoothed_last"] = smoothed[name][-1]
    if len(smoothed) == 2:
        diffs = [abs(a - b) for a, b in zip(smoothed["ours"], smoothed["peer"])]
        curves["max_abs_diff_smoothed"] = max(diffs)
        curves["mean_abs_diff_smoothed"] = sum(diffs) / len(diffs)
        # The inits differ (flax defaults against std 0.02), so the first steps dominate the max.
        curves["max_abs_diff_smoothed_second_half"] = max(diffs[len(diffs) // 2:])
    result["loss_curves"] = curves


def table(result: dict[str, Any]) -> str:
    def fmt(value, spec):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return format(value, spec)
        return format("-", ">" + re.match(r"\d*", spec).group())

    lines = [f"{result['device']} | B={result['shapes']['batch']} T={result['shapes']['seq']} "
             f"L={result['shapes']['layers']} | {result['config']['optimizer']['name']}",
             f"{'side':>10} {'params M':>9} {'compile s':>9} {'step ms':>8} {'tokens/s':>10} {'MFU %':>6} "
             f"{'peak GB':>8} {'est GB':>7} {'loss@end':>8}"]
    curves = result["loss_curves"]
    rows = [(name, r, 1e9, 100.0) for name, r in result["results"].items()]
    rows.append(("ours/peer", result["ratio_ours_over_peer"], 1.0, 1.0))  # ratios: no unit scaling
    for name, r, gb, percent in rows:
        def scaled(key, by, r=r):
            return r[key] / by if isinstance(r.get(key), (int, float)) else None

        ratio = name == "ours/peer"
        lines.append(" ".join([
            f"{name:>10}", fmt(None if ratio else scaled("params", 1e6), "9.2f"), fmt(r.get("compile_s"), "9.2f"),
            fmt(r.get("step_ms_median"), "8.2f"), fmt(r.get("tokens_per_s"), "10.3f" if ratio else "10.0f"),
            fmt(scaled("mfu", 1 / percent), "6.3f" if ratio else "6.2f"), fmt(scaled("peak_bytes_in_use", gb), "8.2f"),
            fmt(scaled("compiled_peak_bytes_estimate", gb), "7.2f"), fmt(curves.get(f"{name}_smoothed_last"), "8.3f"),
        ]) + (f"  ERROR {r['error'][:120]}" if "error" in r else ""))
    if "max_abs_diff_smoothed" in curves:
        lines.append(f"loss curves (moving average over {curves['smooth_window']} steps): "
                     f"max |ours - peer| = {curves['max_abs_diff_smoothed']:.4f} nats "
                     f"(second half {curves['max_abs_diff_smoothed_second_half']:.4f})")
    return "\n".join(lines)


def _default_out(device_kind: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-") or "unknown"
    stem = os.path.join(REPO, "benchmarks", "results", f"gpt_train_{slug}_{datetime.date.today().isoformat()}")
    path, n = stem + ".json", 2
    while os.path.exists(path):  # never overwrite an earlier run of the day
        path, n = f"{stem}_{n}.json", n + 1
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_argument_group("shapes")
    shape.add_argument("--batch", type=int, default=16)
    shape.add_argument("--seq", type=int, default=1024)
    shape.add_argument("--layers", type=int, default=12)
    shape.add_argument("--heads", type=int, default=12)
    shape.add_argument("--d-model", type=int, default=768)
    shape.add_argument("--d-ff", type=int, default=0, help="default 4 * d_model (the peer's only choice)")
    shape.add_argument("--vocab", type=int, default=50304)
    ours = parser.add_argument_group("ours")
    ours.add_argument("--attention", default="auto", choices=("auto", "cudnn", "xla", "pallas"))
    ours.add_argument("--norm", default="auto", choices=("auto", "xla", "pallas"))
    ours.add_argument("--loss", default="auto", choices=("auto", "xla", "chunked", "pallas"))
    ours.add_argument("--remat", action="store_true")
    ours.add_argument("--unfused-loss", action="store_true", help="GPTConfig.fused_loss=False (logits, then CE)")
    peer = parser.add_argument_group("peer")
    peer.add_argument("--peer", default="auto", help="path to gpt2_flax.py, 'auto' (../shared/peers, shared/peers) "
                                                     "or 'builtin' (the copy in this file)")
    peer.add_argument("--peer-attention", default=None, choices=("cudnn", "xla", "auto"),
                      help="the peer's ATTN (default cudnn on GPU, xla elsewhere)")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--sides", default="peer,ours", help="which to run, in this order")
    run_group.add_argument("--steps", type=int, default=50, help="timed steps")
    run_group.add_argument("--warmup", type=int, default=5, help="untimed steps after the curve")
    run_group.add_argument("--curve-steps", type=int, default=200)
    run_group.add_argument("--curve-every", type=int, default=10)
    run_group.add_argument("--smooth", type=int, default=10, help="moving-average window for the curve comparison")
    run_group.add_argument("--optimizer", default="gpt2", choices=("gpt2", "peer"))
    run_group.add_argument("--lr", type=float, default=6e-4)
    run_group.add_argument("--schedule", default="cosine", choices=("cosine", "constant"))
    run_group.add_argument("--lr-warmup", type=int, default=20)
    run_group.add_argument("--seed", type=int, default=0)
    run_group.add_argument("--data-vocab", type=int, default=8192)
    run_group.add_argument("--phrases", type=int, default=1024)
    run_group.add_argument("--phrase-len", type=int, default=8)
    run_group.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100: 989)")
    run_group.add_argument("--out", default=None,
                           help="JSON path (default benchmarks/results/gpt_train_<device>_<date>.json)")
    args = parser.parse_args(argv)
    args.d_ff = args.d_ff or 4 * args.d_model
    if args.d_model % args.heads:
        parser.error(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    if min(args.steps, args.curve_steps, args.curve_every, args.smooth) < 1 or args.warmup < 0:
        parser.error("--steps, --curve-steps, --curve-every and --smooth must be >= 1, --warmup >= 0")
    if args.d_ff != 4 * args.d_model:
        print(f"gpt_train: the peer's MLP is always 4 * d_model = {4 * args.d_model}; ours uses {args.d_ff}",
              file=sys.stderr)

    result = run(args)
    out = args.out or _default_out(result["device"])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result), flush=True)
    print(table(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
