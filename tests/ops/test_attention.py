"""ops.attention: the reference against numpy loops, the Pallas kernels (both
families, interpret mode) against the reference in values and gradients,
masked rows, TPU lowering and input errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

from lepton_jax import ops
from lepton_jax.pallas import BlockSizes, default_block_sizes, flash_attention

TOLERANCE = {jnp.float32: 2e-4, jnp.bfloat16: 4e-2, jnp.float16: 6e-3}


def _inputs(seed, B, Sq, Skv, H, K, D, dtype=jnp.float32):
    # numpy draws: a jax.random draw of each new shape would compile anew.
    rng = np.random.default_rng(seed)
    q, k, v, d_out = (jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
                      for shape in [(B, Sq, H, D), (B, Skv, K, D), (B, Skv, K, D), (B, Sq, H, D)])
    return q, k, v, d_out


def _segments(B, S, pieces):
    bounds = np.linspace(0, S, pieces + 1).astype(int)
    ids = np.zeros(S, np.int32)
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        ids[a:b] = n
    return jnp.asarray(np.tile(ids, (B, 1)))


def _numpy_attention(q, k, v, causal, q_ids=None, kv_ids=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, Sq, H, D = q.shape
    Skv, K = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            kh = h // (H // K)
            for i in range(Sq):
                visible = [j for j in range(Skv)
                           if (not causal or j <= i + Skv - Sq)
                           and (q_ids is None or q_ids[b, i] == kv_ids[b, j])]
                if not visible:
                    continue
                s = np.array([q[b, i, h] @ k[b, j, kh] for j in visible]) / np.sqrt(D)
                p = np.exp(s - s.max())
                out[b, i, h] = (p / p.sum()) @ v[b, visible, kh]
    return out


@pytest.mark.parametrize("causal, Sq, Skv, H, K, segments", [
    (False, 7, 7, 2, 2, False), (True, 5, 9, 4, 2, False), (True, 6, 6, 3, 1, True), (False, 4, 8, 2, 1, True)])
def test_reference_matches_numpy_loops(causal, Sq, Skv, H, K, segments):
    q, k, v, _ = _inputs(0, 2, Sq, Skv, H, K, 8)
    q_ids = _segments(2, Sq, 2) if segments else None
    kv_ids = _segments(2, Skv, 2) if segments else None
    got = ops.attention(q, k, v, causal=causal, segment_ids=(q_ids, kv_ids) if segments else None,
                        implementation="xla")
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, causal, q_ids, kv_ids), rtol=1e-5, atol=1e-5)


def test_reference_gradients_and_auto_on_cpu():
    q, k, v, _ = _inputs(1, 1, 5, 5, 2, 1, 4)
    check_grads(jax.jit(lambda q, k, v: ops.attention(q, k, v, causal=True, implementation="xla")), (q, k, v),
                order=1, modes=("rev",), atol=1e-2, rtol=1e-2)
    np.testing.assert_array_equal(ops.attention(q, k, v), ops.attention(q, k, v, implementation="xla"))


def _check_kernel_against_reference(backend, monkeypatch, *, seed, causal, segments, groups, Sq, Skv, D, dtype,
                                    block_sizes=None):
    monkeypatch.setenv("LEPTON_PALLAS_BACKEND", backend)
    K = 2 if groups < 4 else 1
    q, k, v, d_out = _inputs(seed, 1, Sq, Skv, K * groups, K, D, dtype)
    segment_ids = None
    if segments:
        segment_ids = (_segments(1, Sq, 2), _segments(1, Skv, 2))

    def run(implementation):
        f = lambda q, k, v: ops.attention(q, k, v, causal=causal, segment_ids=segment_ids,  # noqa: E731
                                          implementation=implementation, block_sizes=block_sizes)

        # Forward and backward compiled as one program: eagerly, every op of
        # the reference and of the interpreted kernel's wiring compiles alone.
        @jax.jit
        def forward_and_vjp(q, k, v, d_out):
            out, vjp = jax.vjp(f, q, k, v)
            return (out, *vjp(d_out))

        return forward_and_vjp(q, k, v, d_out)

    expected = run("xla")
    got = run("pallas")
    tol = TOLERANCE[dtype]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        assert a.dtype == b.dtype == dtype, name
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.all(np.isfinite(a)), name
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, atol=tol * scale, rtol=tol, err_msg=name)


_grid = dict(
    seed=st.integers(0, 100), causal=st.booleans(), segments=st.booleans(), groups=st.sampled_from([1, 2, 4]),
    Sq=st.integers(1, 70), Skv=st.integers(1, 70), D=st.sampled_from([64, 80, 96, 128, 256]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@settings(max_examples=3, deadline=None)
@given(**_grid)
def test_pallas_kernels_match_reference(backend, seed, causal, segments, groups, Sq, Skv, D, dtype):
    # hypothesis does not mix with the monkeypatch fixture; patch by hand.
    with pytest.MonkeyPatch.context() as monkeypatch:
        _check_kernel_against_reference(backend, monkeypatch, seed=seed, causal=causal, segments=segments,
                                        groups=groups, Sq=Sq, Skv=Skv, D=D, dtype=dtype)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_pallas_multiple_blocks_causal_gqa_unaligned(backend, monkeypatch):
    # Small blocks force several q and kv blocks, causal tile skipping and padding.
    _check_kernel_against_reference(backend, monkeypatch, seed=3, causal=True, segments=True, groups=2,
                                    Sq=45, Skv=77, D=64, dtype=jnp.float32,
                                    block_sizes=BlockSizes(16, 16, 16, 32))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_fully_masked_rows_give_zeros_not_nan(backend, monkeypatch):
    monkeypatch.setenv("LEPTON_PALLAS_BACKEND", backend)
    q, k, v, d_out = _inputs(0, 1, 8, 4, 2, 2, 64)
    # Causal with q_len > kv_len: the first 4 queries see no key at all.
    q_ids = jnp.asarray([[0, 0, 0, 0, 0, 0, 9, 9]], jnp.int32)  # segment 9 has no key either
    kv_ids = jnp.zeros((1, 4), jnp.int32)
    for implementation in ("xla", "pallas"):
        f = lambda q, k, v: ops.attention(q, k, v, causal=True, segment_ids=(q_ids, kv_ids),  # noqa: E731
                                          implementation=implementation)

        @jax.jit
        def forward_and_vjp(q, k, v, d_out):
            out, vjp = jax.vjp(f, q, k, v)
            return out, *vjp(d_out)

        out, dq, dk, dv = forward_and_vjp(q, k, v, d_out)
        np.testing.assert_array_equal(out[:, :4], 0.0)
        np.testing.assert_array_equal(out[:, 6:], 0.0)
        np.testing.assert_array_equal(dq[:, :4], 0.0)
        for x in (out, dq, dk, dv):
            assert np.all(np.isfinite(np.asarray(x)))
        assert np.abs(np.asarray(out[:, 4:6])).max() > 0


def _numpy_lse(q, k, causal, q_ids, kv_ids):
    """Each row's log-sum-exp of the scaled, masked scores ``[B, Sq, H]`` (-inf without keys)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, Sq, H, D = q.shape
    Skv, K = k.shape[1], k.shape[2]
    k = np.repeat(k, H // K, axis=2)
    s = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(D)
    visible = np.ones((B, 1, Sq, Skv), bool)
    if causal:
        visible &= (np.arange(Skv)[None, :] <= np.arange(Sq)[:, None] + Skv - Sq)[None, None]
    visible &= (np.asarray(q_ids)[:, None, :, None] == np.asarray(kv_ids)[:, None, None, :])
    with np.errstate(divide="ignore"):
        lse = np.log(np.sum(np.where(visible, np.exp(s), 0.0), axis=-1))
    return lse.transpose(0, 2, 1)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_log_sum_exp_values_and_gradients(backend, monkeypatch):
    """return_lse: the rows' log-sum-exp equals numpy's (-inf for a row without
    keys); the kernels' lse is differentiable and agrees with autodiff of the
    reference, out and lse both feeding the loss (what ring attention needs)."""
    monkeypatch.setenv("LEPTON_PALLAS_BACKEND", backend)
    q, k, v, d_out = _inputs(7, 2, 24, 24, 4, 2, 16)
    q_ids = _segments(2, 24, 3).at[:, :4].set(7)  # rows 0-3: a segment with no key
    kv_ids = _segments(2, 24, 3)
    weights = jnp.asarray(np.random.default_rng(8).standard_normal((2, 24, 4)), jnp.float32)
    want_lse = _numpy_lse(q, k, True, q_ids, kv_ids)

    def loss(implementation, q, k, v):
        out, lse = ops.attention(q, k, v, causal=True, segment_ids=(q_ids, kv_ids), implementation=implementation,
                                 return_lse=True)
        return jnp.sum(out * d_out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse * weights, 0.0)), (out, lse)

    results = {}
    for implementation in ("xla", "pallas"):
        grad = jax.jit(jax.grad(lambda *a: loss(implementation, *a), argnums=(0, 1, 2), has_aux=True))
        grads, (out, lse) = grad(q, k, v)
        np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)  # -inf rows compare equal
        np.testing.assert_allclose(out, _numpy_attention(q, k, v, True, q_ids, kv_ids), rtol=2e-4, atol=2e-4)
        results[implementation] = grads
    for name, got, want in zip("qkv", results["pallas"], results["xla"]):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=f"d{name}")
    # The reference's gradient through the lse, against finite differences.
    check_grads(jax.jit(lambda q: ops.attention(q, k, v, causal=True, implementation="xla", return_lse=True)[1]), (q,),
                order=1, modes=("rev",), atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="does not return the log-sum-exp"):
        ops.attention(q, k, v, implementation="cudnn", return_lse=True)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_kernels_under_x64(backend, monkeypatch):
    """With 64-bit mode on globally, the kernels give what the reference gives
    for the same input dtypes: odd shapes, GQA, segment ids, causal (a grid
    index divided by a Python int became int64 there and failed)."""
    with jax.enable_x64(True):
        _check_kernel_against_reference(backend, monkeypatch, seed=5, causal=True, segments=True, groups=2,
                                        Sq=45, Skv=77, D=64, dtype=jnp.float32, block_sizes=BlockSizes(16, 16, 16, 32))
        _check_kernel_against_reference(backend, monkeypatch, seed=6, causal=False, segments=False, groups=4,
                                        Sq=13, Skv=9, D=80, dtype=jnp.bfloat16)
        if backend == "tpu":
            test_tpu_kernels_lower_for_the_tpu_platform()


def test_tpu_kernels_lower_for_the_tpu_platform():
    q = jax.ShapeDtypeStruct((1, 200, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 300, 2, 128), jnp.bfloat16)
    ids_q, ids_kv = jax.ShapeDtypeStruct((1, 200), jnp.int32), jax.ShapeDtypeStruct((1, 300), jnp.int32)

    def loss(q, k, v, ids_q, ids_kv):
        out = flash_attention(q, k, v, causal=True, q_segment_ids=ids_q, kv_segment_ids=ids_kv,
                              backend="tpu", interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, ids_q, ids_kv).lower(
        lowering_platforms=("tpu",))
    text = lowered.as_text()
    assert text.count("tpu_custom_call") == 3  # forward, dk/dv and dq kernels


def test_block_size_table():
    assert default_block_sizes("gpu", "NVIDIA H100 80GB HBM3").num_warps == 8
    assert default_block_sizes("gpu", "some other gpu") == BlockSizes()
    assert default_block_sizes("tpu", "TPU v5p").block_k == 128


def test_bad_inputs_name_the_arguments(monkeypatch):
    q, k, v, _ = _inputs(0, 2, 8, 8, 4, 2, 16)
    with pytest.raises(ValueError, match="q has head_dim 16 but k has 8"):
        ops.attention(q, k[..., :8], v[..., :8])
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of k/v heads \(3\)"):
        k3 = jnp.zeros((2, 8, 3, 16))
        ops.attention(q, k3, k3)
    with pytest.raises(ValueError, match=r"q must have rank 4 \[batch, seq, heads, head_dim\], got shape \(8, 4, 16\)"):
        ops.attention(q[0], k, v)
    with pytest.raises(ValueError, match="q has batch 2 but k and v have batch 1"):
        ops.attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match=r"k and v must have the same shape, got k \(2, 8, 2, 16\) and v \(2, 7, 2, 16\)"):
        ops.attention(q, k, v[:, :7])
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):
        ops.attention(q.astype(jnp.bfloat16), k, v)
    with pytest.raises(ValueError, match=r"q segment_ids must have shape \(2, 8\), got \(2, 7\)"):
        ops.attention(q, k, v, segment_ids=jnp.zeros((2, 7), jnp.int32))
    with pytest.raises(TypeError, match="q segment_ids must be an integer array, got dtype float32"):
        ops.attention(q, k, v, segment_ids=jnp.zeros((2, 8)))
    with pytest.raises(ValueError, match="implementation='cudnn' cannot serve these inputs: it needs an NVIDIA GPU"):
        ops.attention(q, k, v, implementation="cudnn")
    with pytest.raises(ValueError, match=r"implementation must be one of \('auto', 'xla', 'pallas', 'cudnn'\)"):
        ops.attention(q, k, v, implementation="triton")
    monkeypatch.setenv("LEPTON_PALLAS_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"LEPTON_PALLAS_BACKEND must be one of \('gpu', 'tpu'\), got 'cuda'"):
        ops.attention(q, k, v, implementation="pallas")
