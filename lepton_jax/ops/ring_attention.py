"""Context (sequence) parallel attention: ring attention over a mesh axis.

The sequence is split in order over a mesh axis of ``n`` devices; device
``r`` holds queries, keys and values of positions ``[r*c, (r+1)*c)``. Each
device attends its queries to its own key block, then passes the key/value
block (and its segment ids) to the next device with ``ppermute`` and
attends to the block it receives, ``n`` times in all. Every block is one
``ops.attention`` call (so the Pallas kernels do the work on GPU/TPU) that
also returns the rows' log-sum-exp; the partial outputs are merged by an
online softmax: ``lse = logaddexp(lse_a, lse_b)``,
``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``.

With a causal mask a block is either the diagonal (own block: causal within
it), wholly visible (a block from an earlier device) or wholly masked (from a
later device: skipped, no compute). Per device the scores are ``[c, c]``
instead of ``[S, S]``, and activations ``[B, c, ...]``.

Devices early in the sequence skip more blocks, so the work is unbalanced
under causal masking (device ``n-1`` computes ``n`` blocks, device 0 one);
striped or zig-zag orderings balance it at the cost of a permuted sequence.
"""

from __future__ import annotations

import functools

import flax.linen as linen
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lepton_jax.ops.attention import attention

_F32 = jnp.float32


def _merge(out_a, lse_a, out_b, lse_b):
    """Online-softmax merge of two partial attentions over disjoint key sets:
    ``out`` ``[B, S, H, D]`` fp32 normalised over its keys, ``lse`` ``[B, S, H]``
    (``-inf`` where no key was seen)."""
    m = jax.lax.stop_gradient(jnp.maximum(lse_a, lse_b))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w_a, w_b = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
    total = w_a + w_b
    seen = total > 0.0
    safe = jnp.where(seen, total, 1.0)
    out = (out_a * w_a[..., None] + out_b * w_b[..., None]) / safe[..., None]
    return out, jnp.where(seen, m + jnp.log(safe), -jnp.inf)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str, causal: bool = False,
                   q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                   scale: float | None = None, implementation: str = "auto") -> jax.Array:
    """Attention of this device's sequence block, inside ``shard_map`` over ``axis_name``.

    Args:
      q: ``[B, c, H, D]``, k, v: ``[B, c, K, D]``: this device's block of a
        sequence split in order over ``axis_name`` (``c = S / n``).
      causal: a causal mask over the whole sequence.
      q_segment_ids, kv_segment_ids: ``[B, c]`` int, this block's ids (both or neither).
      scale, implementation: as ``ops.attention``.

    Returns ``[B, c, H, D]``: this block's rows of attention over the whole sequence.
    """
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("ring_attention: give both q_segment_ids and kv_segment_ids, or neither")
    n = jax.lax.axis_size(axis_name)
    r = jax.lax.axis_index(axis_name)
    B, c, H, D = q.shape

    def block(k, v, kv_ids, block_causal):
        segments = None if q_segment_ids is None else (q_segment_ids, kv_ids)
        out, lse = attention(q, k, v, causal=block_causal, segment_ids=segments, scale=scale,
                             implementation=implementation, return_lse=True)
        return out.astype(_F32), lse

    def skipped():
        return jnp.zeros((B, c, H, D), _F32), jnp.full((B, c, H), -jnp.inf, _F32)

    out, lse = block(k, v, kv_segment_ids, causal)  # the diagonal block
    ring = [(i, (i + 1) % n) for i in range(n)]
    carried = (k, v) if kv_segment_ids is None else (k, v, kv_segment_ids)
    for t in range(1, n):
        carried = jax.lax.ppermute(carried, axis_name, ring)  # now the block of device r - t
        k_t, v_t, ids_t = carried if kv_segment_ids is not None else (*carried, None)
        if causal:  # earlier in the sequence (t <= r): all visible; later (wrapped round): all masked
            out_t, lse_t = jax.lax.cond(t <= r, lambda: block(k_t, v_t, ids_t, False), skipped)
        else:
            out_t, lse_t = block(k_t, v_t, ids_t, False)
        out, lse = _merge(out, lse, out_t, lse_t)
    return out.astype(q.dtype)


def mesh_axis_of(logical: str) -> str | None:
    """The mesh axis the active logical rules put ``logical`` on, when it has more
    than one device (inside ``jax.set_mesh`` and ``linen.logical_axis_rules``, as
    the parallel train steps trace); else ``None``. Rules that spread it over
    several such axes are refused: a ring or a pipeline runs along one."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = linen.get_logical_axis_rules()
    if mesh.empty or not rules:
        return None
    target = linen.logical_to_mesh_axes((logical,), rules)[0]
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    if len(axes) > 1:
        raise ValueError(f"the rules put {logical!r} on several mesh axes {axes}; it can take one")
    return axes[0] if axes else None


def sequence_axis() -> str | None:
    """The mesh axis of size > 1 holding ``"seq"`` under the active rules (context parallelism), or ``None``."""
    return mesh_axis_of("seq")


def _spec(names: tuple[str | None, ...]) -> PartitionSpec:
    return linen.logical_to_mesh_axes(names, linen.get_logical_axis_rules())


def sequence_parallel_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                                segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
                                scale: float | None = None,
                                implementation: str = "auto") -> jax.Array:
    """``ops.attention`` on global ``[B, S, H, D]`` / ``[B, S, K, D]`` arrays
    whose sequence the rules shard over ``sequence_axis()``: ring attention
    under ``shard_map`` (batch, heads and sequence split as the rules say).
    ``segment_ids`` is ``[B, S]`` or a ``(q_ids, kv_ids)`` pair. Self-attention
    only (``Sq == Skv``)."""
    axis = sequence_axis()
    if axis is None:
        raise ValueError("sequence_parallel_attention: no mesh axis of size > 1 holds 'seq' under the active rules")
    mesh = jax.sharding.get_abstract_mesh()
    n = mesh.shape[axis]
    S = q.shape[1]
    if k.shape[1] != S:
        raise ValueError(f"sequence_parallel_attention: self-attention only, got q length {S} and kv length "
                         f"{k.shape[1]}")
    if S % n:
        raise ValueError(f"attention: the sequence length {S} does not divide over mesh axis {axis!r} of size {n} "
                         "(the rules put 'seq' there); use a length that is a multiple of it")
    q_spec = _spec(("batch", "seq", "heads", "head_dim"))
    kv_spec = _spec(("batch", "seq", "kv_heads", "head_dim"))
    ids_spec = _spec(("batch", "seq"))
    body = functools.partial(ring_attention, axis_name=axis, causal=causal, scale=scale,
                             implementation=implementation)
    args, specs = [q, k, v], [q_spec, kv_spec, kv_spec]
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
        args += [q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)]
        specs += [ids_spec, ids_spec]

    def local(q, k, v, *ids):
        return body(q, k, v, **dict(zip(("q_segment_ids", "kv_segment_ids"), ids)))

    return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=q_spec, check_vma=False)(*args)
