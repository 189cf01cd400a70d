"""Pipeline parallelism: stacked layers split into stages over a ``stage`` mesh axis.

A model whose layer parameters are stacked on a leading ``layers`` axis
(``[L, ...]``) runs them as ``N`` stages of ``L / (N * R)`` layers each,
``R`` times round (``R > 1``: the circular / interleaved schedule, stage
``s`` holding layers ``r*N*Lps + s*Lps + j`` for each repeat ``r``). The
batch is split into ``M`` microbatches. Every iteration each stage applies
its layers to the microbatch in front of it, then the activations move one
stage on: a ``jnp.roll`` of the ``[N, ...]`` state along the stage-sharded
axis, which the XLA SPMD partitioner lowers to a collective permute between
neighbouring stages. Stage ``s`` works on microbatch ``m`` of repeat ``r``
at iteration ``r*M + m + s``; a microbatch leaving the last stage waits in a
buffer until stage 0 takes it for the next repeat (so ``R > 1`` needs
``M >= N``). The schedule is GPipe's (all forwards, then the backward by
autodiff of the loop, in reverse), made circular by the repeats.

Everything is one ``jax.jit`` with shardings (no ``shard_map``), so data,
FSDP and tensor parallelism apply to the other axes of the same arrays as
usual. Idle stage slots (the bubble) compute on zeros whose results are
never read: ``(N - 1) / (R*M + N - 1)`` of the iterations.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as linen
import jax
import jax.numpy as jnp

from lepton_jax.ops.ring_attention import mesh_axis_of

# The logical names of the pipeline's arrays (rules map "layers" and "stages" to the stage mesh axis).
STATE = ("stages", "batch", "seq", "embed")
BUFFER = (None, "batch", "seq", "embed")


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The schedule's idle fraction: ``(N - 1) / (R*M + N - 1)`` of the
    stage-iterations do no work (0 for one stage)."""
    return (stages - 1) / (repeats * microbatches + stages - 1)


def stage_axis() -> str | None:
    """The mesh axis of size > 1 holding ``"stages"`` under the active rules
    (inside ``jax.set_mesh`` and the rules), or ``None``."""
    return mesh_axis_of("stages")


def check_pipeline(*, num_layers: int, stages: int, repeats: int, microbatches: int, batch: int,
                   data_ways: int = 1) -> None:
    """Raises ``ValueError`` naming the setting when the pipeline cannot be
    laid out: layers not divisible by ``stages * repeats``, a batch not
    divisible by ``microbatches * data_ways``, or circular repeats with fewer
    microbatches than stages."""
    for name, value in (("stages", stages), ("repeats", repeats), ("microbatches", microbatches)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"pipeline: {name} must be a positive int, got {value!r}")
    if num_layers % (stages * repeats):
        raise ValueError(f"pipeline: {num_layers} layers do not split into {stages} stages x {repeats} repeats "
                         f"(= {stages * repeats}); use a number of layers that is a multiple of it")
    if batch % (microbatches * data_ways):
        raise ValueError(f"pipeline: batch {batch} does not divide into {microbatches} microbatches x "
                         f"{data_ways} data-parallel ways (= {microbatches * data_ways})")
    if repeats > 1 and microbatches < stages:
        raise ValueError(f"pipeline: the circular schedule ({repeats} repeats) needs microbatches >= stages, got "
                         f"{microbatches} microbatches for {stages} stages")


def _constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    return linen.with_logical_constraint(x, tuple(names))


def pipeline(apply_layer: Callable[..., jax.Array], layer_params: Any, x_BxSxE: jax.Array,
             per_example: Sequence[jax.Array] = (), *, stages: int, microbatches: int, repeats: int = 1,
             remat: bool = False, spmd_axis_name: str | None = None) -> jax.Array:
    """Runs ``L`` stacked layers over ``x`` as a pipeline; the same value as
    applying the layers in order to the whole batch.

    Args:
      apply_layer: ``(params of one layer, x [b, S, E], *per_example [b, ...]) -> [b, S, E]``.
      layer_params: a tree whose leaves are ``[L, ...]``, layer ``l`` at index ``l``.
      x_BxSxE: the batch entering the first layer.
      per_example: arrays ``[B, ...]`` the layers also take (segment ids), split like ``x``.
      stages, microbatches, repeats: ``N``, ``M``, ``R`` (see the module docstring).
      remat: rematerialise each stage's layers in the backward pass (only the
        stage inputs are kept).
      spmd_axis_name: the mesh axis of the stages (``vmap``'s
        ``spmd_axis_name``, so constraints inside the layers keep it).

    Returns ``[B, S, E]``.
    """
    L = jax.tree.leaves(layer_params)[0].shape[0]
    B = x_BxSxE.shape[0]
    N, M, R = stages, microbatches, repeats
    check_pipeline(num_layers=L, stages=N, repeats=R, microbatches=M, batch=B)
    per_stage = L // (N * R)
    mb = B // M

    # [L, ...] -> [R, N, Lps, ...]: layer r*N*Lps + s*Lps + j is stage s's j-th layer in repeat r.
    params = jax.tree.map(lambda p: p.reshape(R, N, per_stage, *p.shape[1:]), layer_params)
    params = jax.tree.map(lambda p: _constrain(p, (None, "stages") + (None,) * (p.ndim - 2)), params)

    def stage_fn(p_stage, x, *extra):
        def body(x, p_layer):
            return apply_layer(p_layer, x, *extra), None
        return jax.lax.scan(body, x, p_stage)[0]

    if remat:
        stage_fn = jax.checkpoint(stage_fn)
    run_stages = jax.vmap(stage_fn, spmd_axis_name=spmd_axis_name)

    # Microbatch m takes rows m, m + M, m + 2M, ...: each stays split over the data axes like the batch.
    def split(a):
        return a.reshape(mb, M, *a.shape[1:]).swapaxes(0, 1)

    buffer = _constrain(split(x_BxSxE), BUFFER)
    extras = [split(a) for a in per_example]
    stage_ids = jnp.arange(N)
    state = _constrain(jnp.zeros((N, mb) + x_BxSxE.shape[1:], x_BxSxE.dtype), STATE)

    def iteration(carry, t):
        state, buffer = carry
        # Stage 0 takes microbatch t mod M from the buffer (the input, or its previous repeat's output).
        first = jax.lax.dynamic_index_in_dim(buffer, t % M, keepdims=False)
        state = jnp.where((stage_ids == 0)[:, None, None, None], first[None], state)
        state = _constrain(state, STATE)
        work = t - stage_ids  # the (repeat, microbatch) index each stage works on
        if R == 1:
            p_stage = jax.tree.map(lambda p: p[0], params)
        else:
            repeat = jnp.clip(work // M, 0, R - 1)
            p_stage = jax.tree.map(lambda p: jax.vmap(lambda p_r, r: p_r[r], in_axes=(1, 0))(p, repeat), params)
        extra_stage = [jnp.take(e, work % M, axis=0) for e in extras]
        out = _constrain(run_stages(p_stage, state, *extra_stage), STATE)
        # The last stage finishes microbatch (t - N + 1) mod M of some repeat: back to the buffer.
        # (Before it has finished one, the slot is rewritten with what it holds: only one
        # microbatch of the buffer is touched per iteration, not the whole batch.)
        slot = (t - (N - 1)) % M
        kept = jax.lax.dynamic_index_in_dim(buffer, slot, keepdims=False)
        finished = jnp.where(t >= N - 1, out[N - 1], kept)
        buffer = _constrain(jax.lax.dynamic_update_index_in_dim(buffer, finished, slot, axis=0), BUFFER)
        return (jnp.roll(out, 1, axis=0), buffer), None

    (_, buffer), _ = jax.lax.scan(iteration, (state, buffer), jnp.arange(R * M + N - 1))
    return buffer.swapaxes(0, 1).reshape(x_BxSxE.shape)
