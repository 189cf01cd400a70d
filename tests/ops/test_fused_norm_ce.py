"""Fused norm kernels and linear cross-entropy (chunked, and both Pallas
families in interpret mode) against their jnp twins and optax; memory; TPU
lowering; errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from lepton_jax import nn, ops
from lepton_jax.ops import cross_entropy
from lepton_jax.pallas import linear_cross_entropy as ce_kernels
from lepton_jax.pallas import norm as norm_kernels

TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2, jnp.float16: 4e-3}


def _close(a, b, dtype, name):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a)), name
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(a, b, atol=tol * max(1.0, float(np.abs(b).max())), rtol=tol, err_msg=name)


def _norm_fn(kind, implementation, with_residual):
    def f(x, residual, scale, bias):
        r = residual if with_residual else None
        if kind == "layer":
            return ops.layer_norm(x, scale, bias, residual=r, implementation=implementation)
        return ops.rms_norm(x, scale, residual=r, implementation=implementation)
    return f


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@settings(max_examples=4, deadline=None)
@given(kind=st.sampled_from(["layer", "rms"]), lead=st.lists(st.integers(1, 9), min_size=1, max_size=2),
       hidden=st.sampled_from([128, 200, 384, 1000]), with_residual=st.booleans(),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]), seed=st.integers(0, 50))
def test_norm_kernels_match_reference(backend, kind, lead, hidden, with_residual, dtype, seed):
    _check_norm(backend, kind, lead, hidden, with_residual, dtype, seed)


def _check_norm(backend, kind, lead, hidden, with_residual, dtype, seed):
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("LEPTON_PALLAS_BACKEND", backend)
        rng = np.random.default_rng(seed)  # numpy draws: a jax.random draw of a new shape compiles anew
        shape = (*lead, hidden)
        x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32).astype(dtype)
        residual = jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
        scale, bias = (jnp.asarray(rng.standard_normal(hidden), jnp.float32) for _ in range(2))
        # Forward and backward of each implementation compiled as one program.
        @jax.jit
        def forward_and_vjp(x, residual, scale, bias, key):
            results = []
            for implementation in ("xla", "pallas"):
                out, vjp = jax.vjp(_norm_fn(kind, implementation, with_residual), x, residual, scale, bias)
                cotangent = jax.tree.map(lambda a: jax.random.normal(key, a.shape).astype(a.dtype), out)
                results.append((out, vjp(cotangent)))
            return results

        (expected, grads_ref), (got, grads_kernel) = forward_and_vjp(x, residual, scale, bias, jax.random.PRNGKey(seed))
        for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
            assert g.dtype == e.dtype == dtype
            _close(g, e, dtype, "forward")
        for name, e, g in zip(("dx", "dresidual", "dscale", "dbias"), grads_ref, grads_kernel):
            _close(g, e, dtype, name)


def test_norm_backward_uses_per_program_partials_not_rows_by_hidden():
    config = norm_kernels.NormConfig(kind="layer", eps=1e-5, hidden=4096, has_residual=False, has_bias=True,
                                     backend="gpu", interpret=True)
    hidden_pad, block_rows, programs, per = norm_kernels._layout(config, 16384)
    assert programs <= config.max_programs and programs * per * block_rows >= 16384
    # The fp32 partial buffers are programs x hidden: 1/32 of rows x hidden here.
    assert programs * hidden_pad * 32 <= 16384 * 4096


def test_nn_norm_modules_run_the_kernels():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 128))
    for module in (nn.LayerNorm(), nn.RMSNorm()):
        variables = module.init(jax.random.PRNGKey(1), x)
        kernel = module.clone(implementation="pallas")
        np.testing.assert_allclose(kernel.apply(variables, x), module.apply(variables, x), rtol=1e-5, atol=1e-5)


def _ce_inputs(seed, T, H, V, ignore_every=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)  # numpy draws: a jax.random draw of a new shape compiles anew
    x = jnp.asarray(rng.standard_normal((T, H)), jnp.float32).astype(dtype)
    w = jnp.asarray(rng.standard_normal((H, V)) / np.sqrt(H), jnp.float32).astype(dtype)
    labels = jnp.asarray(rng.integers(0, V, T), jnp.int32)
    if ignore_every:
        labels = labels.at[::ignore_every].set(-100)
    return x, w, labels


@pytest.mark.parametrize("implementation, backend", [("chunked", None), ("pallas", "gpu"), ("pallas", "tpu")])
@settings(max_examples=3, deadline=None)  # each drawn shape compiles anew: keep the suite fast
@given(T=st.integers(1, 300), H=st.integers(1, 40), V=st.integers(2, 700), chunk=st.sampled_from([16, 64, 128]),
       eps=st.sampled_from([0.0, 0.1]), z_loss=st.sampled_from([0.0, 1e-3]), ignore_every=st.sampled_from([0, 3]),
       reduction=st.sampled_from(["mean", "sum", "none"]), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       seed=st.integers(0, 50))
def test_fused_linear_ce_matches_reference(implementation, backend, T, H, V, chunk, eps, z_loss, ignore_every,
                                           reduction, dtype, seed):
    with pytest.MonkeyPatch.context() as monkeypatch:
        if backend:
            monkeypatch.setenv("LEPTON_PALLAS_BACKEND", backend)
        _check_linear_ce(implementation, T, H, V, chunk, eps, z_loss, ignore_every, reduction, dtype, seed)


def _check_linear_ce(implementation, T, H, V, chunk, eps, z_loss, ignore_every, reduction, dtype, seed):
    x, w, labels = _ce_inputs(seed, T, H, V, ignore_every, dtype)

    def f(implementation):
        def loss(x, w):
            out = ops.linear_cross_entropy(x, w, labels, label_smoothing=eps, z_loss=z_loss, reduction=reduction,
                                           implementation=implementation, chunk_size=chunk)
            return jnp.sum(out * jnp.arange(1, out.size + 1).reshape(out.shape))  # weights exercise "none"
        return jax.value_and_grad(loss, argnums=(0, 1))

    # Each implementation's value and gradients compiled as one program.
    (expected, (dx_ref, dw_ref)), (got, (dx, dw)) = jax.jit(f("xla"))(x, w), jax.jit(f(implementation))(x, w)
    _close(got, expected, jnp.float32 if dtype == jnp.float32 else dtype, "loss")
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    _close(dx, dx_ref, dtype, "dx")
    _close(dw, dw_ref, dtype, "dw")


def test_reference_matches_optax_and_ignored_tokens_contribute_nothing():
    x, w, labels = _ce_inputs(0, 50, 8, 30, ignore_every=4)
    keep = labels != -100
    logits = x @ w
    targets = optax.smooth_labels(jax.nn.one_hot(labels[keep], 30), 0.1)
    expected = optax.softmax_cross_entropy(logits[keep], targets).mean()
    for implementation in ("xla", "chunked", "pallas"):
        loss = jax.jit(lambda x, w: ops.linear_cross_entropy(x, w, labels, label_smoothing=0.1,
                                                             implementation=implementation, chunk_size=16))(x, w)
        np.testing.assert_allclose(loss, expected, rtol=1e-5)
        dx = jax.jit(jax.grad(lambda x: ops.linear_cross_entropy(x, w, labels, implementation=implementation)))(x)
        np.testing.assert_array_equal(dx[~keep], 0.0)
    z = ops.linear_cross_entropy(x, w, labels, z_loss=1e-2, reduction="none")
    lse = jax.nn.logsumexp(logits, axis=-1)
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, labels, 0))
    np.testing.assert_allclose(z, jnp.where(keep, plain + 1e-2 * lse ** 2, 0.0), rtol=1e-5, atol=1e-6)


def test_all_ignored_batch_gives_zero_loss_and_gradients():
    x, w, _ = _ce_inputs(1, 20, 8, 30)
    labels = jnp.full((20,), -100)
    for implementation in ("xla", "chunked", "pallas"):
        loss, (dx, dw) = jax.jit(jax.value_and_grad(
            lambda x, w: ops.linear_cross_entropy(x, w, labels, implementation=implementation, chunk_size=8),
            argnums=(0, 1)))(x, w)
        assert float(loss) == 0.0
        np.testing.assert_array_equal(dx, 0.0)
        np.testing.assert_array_equal(dw, 0.0)


def test_chunked_never_holds_the_full_logits():
    # Tokens dominate, as in training (16384 x 768 x 50304: 617 MB vs 6.7 GB on CPU).
    T, H, V = 8192, 128, 8192
    args = (jax.ShapeDtypeStruct((T, H), jnp.bfloat16), jax.ShapeDtypeStruct((H, V), jnp.bfloat16),
            jax.ShapeDtypeStruct((T,), jnp.int32))

    def temp_bytes(implementation):
        step = jax.value_and_grad(lambda x, w, l: ops.linear_cross_entropy(
            x, w, l, implementation=implementation, chunk_size=256), argnums=(0, 1))
        return jax.jit(step).lower(*args).compile().memory_analysis().temp_size_in_bytes

    full_logits = T * V * 4
    chunked, unfused = temp_bytes("chunked"), temp_bytes("xla")
    assert unfused >= full_logits  # the twin materialises them
    assert chunked < full_logits / 4 and chunked * 8 < unfused


def test_linear_cross_entropy_errors():
    x, w, labels = _ce_inputs(0, 10, 8, 30)
    with pytest.raises(ValueError, match=r"w must have shape \[hidden=8, vocab\], got \(9, 30\)"):
        ops.linear_cross_entropy(x, jnp.ones((9, 30)), labels)
    with pytest.raises(ValueError, match=r"labels must have shape \(10,\) \(x's tokens\), got \(9,\)"):
        ops.linear_cross_entropy(x, w, labels[:9])
    with pytest.raises(TypeError, match="labels must be an integer array, got dtype float32"):
        ops.linear_cross_entropy(x, w, labels.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"x must have rank 2 \[tokens, hidden\], got shape \(2, 5, 8\)"):
        ops.linear_cross_entropy(x.reshape(2, 5, 8), w, labels)
    with pytest.raises(ValueError, match=r"implementation must be one of \('auto', 'xla', 'chunked', 'pallas'\)"):
        ops.linear_cross_entropy(x, w, labels, implementation="triton")
    with pytest.raises(ValueError, match="z_loss must be >= 0, got -1"):
        ops.linear_cross_entropy(x, w, labels, z_loss=-1)


def test_tpu_kernels_lower_for_the_tpu_platform():
    """Norm and linear cross-entropy kernels lower for TPU from this machine."""
    T, H, V = 1000, 768, 5000
    kernel = ce_kernels.CEConfig(vocab=V, eps=0.1, backend="tpu", interpret=False, block_t=128, block_v=512)
    config = cross_entropy._KernelConfig(tokens=T, ignore_index=-100, eps=0.1, z_loss=1e-4, kernel=kernel)
    ce_loss = lambda x, w, l: jnp.sum(cross_entropy._pallas_token_losses(x, w, l, config))  # noqa: E731
    lowered = jax.jit(jax.grad(ce_loss, argnums=(0, 1))).trace(
        jax.ShapeDtypeStruct((T, H), jnp.bfloat16), jax.ShapeDtypeStruct((H, V), jnp.bfloat16),
        jax.ShapeDtypeStruct((T,), jnp.int32)).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 3  # forward, dx, dw

    norm_config = norm_kernels.NormConfig(kind="layer", eps=1e-5, hidden=1000, has_residual=True, has_bias=True,
                                          backend="tpu", interpret=False)

    def norm_loss(x, r, s, b):
        y, h = norm_kernels.fused_norm(x, r, s, b, norm_config)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h.astype(jnp.float32))

    x = jax.ShapeDtypeStruct((1000, 1000), jnp.bfloat16)
    s = jax.ShapeDtypeStruct((1000,), jnp.float32)
    lowered = jax.jit(jax.grad(norm_loss, argnums=(0, 1, 2, 3))).trace(x, x, s, s).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 2  # forward, backward


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_kernels_under_x64(backend):
    """With 64-bit mode on globally (as scientific users run JAX), the norm and
    cross-entropy kernels give what the reference gives for the same input
    dtypes, and the TPU kernels still lower."""
    with jax.enable_x64(True):
        _check_norm(backend, "layer", [3, 5], 200, True, jnp.float32, 1)
        _check_norm(backend, "rms", [7], 128, False, jnp.bfloat16, 2)
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setenv("LEPTON_PALLAS_BACKEND", backend)
            _check_linear_ce("pallas", 37, 16, 300, 64, 0.1, 1e-3, 3, "mean", jnp.float32, 3)
        _check_linear_ce("chunked", 37, 16, 300, 64, 0.1, 1e-3, 3, "none", jnp.float32, 4)
        if backend == "tpu":
            test_tpu_kernels_lower_for_the_tpu_platform()
