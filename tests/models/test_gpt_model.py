"""GPT pieces against independent references: the fused loss against the
plain logits loss (values and gradients), the KV cache against the full
forward, and the byte-level text pipeline."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen

from lepton_jax import data, models


def _tiny(**overrides) -> models.GPTConfig:
    base = dict(vocab_size=40, max_len=12, num_layers=2, num_heads=4, num_kv_heads=2, d_model=32, d_ff=64)
    return models.GPTConfig(**(base | overrides))


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_matches_logits_loss_and_gradients(tie):
    tokens = jax.random.randint(jax.random.PRNGKey(0), (3, 9), 0, 40)
    targets = jax.random.randint(jax.random.PRNGKey(1), (3, 9), 0, 40).at[0, :4].set(-100)
    batch = {"inputs": tokens, "targets": targets, "mask": jnp.array([True, True, False])}
    # One block: the loss is in the head, and a second block would only add compile time.
    plain = models.GPT(_tiny(tie_embeddings=tie, num_layers=1))
    fused = models.GPT(_tiny(tie_embeddings=tie, num_layers=1, fused_loss=True))
    # Jitted: op by op, every small op of the forward and backward passes compiles on its own.
    params = linen.meta.unbox(jax.jit(plain.init)(jax.random.PRNGKey(2), tokens)["params"])

    def loss(model, implementation):
        return lambda p: models.lm_loss(model.apply({"params": p}, tokens, train=True), batch,
                                        implementation=implementation)

    head = jax.jit(lambda p: fused.apply({"params": p}, tokens, train=True))(params)
    assert isinstance(head, models.LMHead) and head.head_ExV.shape == (32, 40)
    # Evaluation still returns logits.
    assert jax.eval_shape(lambda p: fused.apply({"params": p}, tokens), params).shape == (3, 9, 40)
    want, want_grads = jax.jit(jax.value_and_grad(loss(plain, "auto")))(params)
    # Independent value: cross-entropy from the logits by hand, rows 0-1 only, ignored tokens out.
    logits = jax.jit(plain.apply)({"params": params}, tokens)
    logp = jax.nn.log_softmax(logits, -1)
    valid = (targets != -100) & batch["mask"][:, None]
    picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(want, -(picked * valid).sum() / valid.sum(), rtol=1e-6)
    for implementation in ("xla", "chunked"):
        got, got_grads = jax.jit(jax.value_and_grad(loss(fused, implementation)))(params)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_grads, want_grads)


def test_gpt_rejects_bad_tokens():
    model = models.GPT(_tiny())
    with pytest.raises(ValueError, match=r"tokens must be integer \[batch, seq\], got float32 \(2, 3\)"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="sequence length 13 exceeds max_len 12"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 13), jnp.int32))


def test_text_pipeline(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello world " * 50)
    (tmp_path / "b.py").write_bytes(bytes(range(256)))
    tokens = data.load_bytes([str(tmp_path)])
    assert tokens.dtype == np.uint8 and len(tokens) == 600 + 256
    assert len(data.load_bytes([str(tmp_path)], max_bytes=100)) == 100
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_bytes([str(tmp_path / "missing")])
    train_part, held = data.split_tokens(tokens, 0.25)
    np.testing.assert_array_equal(np.concatenate([train_part, held]), tokens)
    windows = data.eval_windows(held, 16, 100)
    np.testing.assert_array_equal(windows["inputs"][:, 1:], windows["targets"][:, :-1])
    np.testing.assert_array_equal(windows["inputs"][1], held[16:32])
    sampler = data.TokenWindows(train_part, 4, 8, seed=3)
    first = [next(sampler) for _ in range(3)]
    for b in first:
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    state = sampler.get_state()
    after = next(sampler)
    again = data.TokenWindows(train_part, 4, 8, seed=3)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["inputs"], after["inputs"])
    with pytest.raises(ValueError, match="seed"):
        data.TokenWindows(train_part, 4, 8, seed=4).set_state(state)


def test_segment_ids_keep_packed_documents_apart():
    model = models.GPT(models.GPTConfig(vocab_size=257, max_len=16, num_layers=2, num_heads=2, d_model=32, d_ff=64,
                                        positions="rotary", attention_implementation="xla"))
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 257)
    variables = jax.jit(model.init)(jax.random.key(1), tokens)
    apply = jax.jit(model.apply)  # one compiled program per shape, not op-by-op dispatch
    segments = jnp.array([[1] * 5 + [2] * 7, [1] * 12])
    packed = apply(variables, tokens, segment_ids=segments)
    # The first document is unaffected by the second; one segment is the plain causal model.
    np.testing.assert_allclose(packed[0, :5], apply(variables, tokens[:1, :5])[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[1], apply(variables, tokens)[1], rtol=1e-6, atol=1e-6)
    # Without segment ids the second document sees the first.
    assert not np.allclose(apply(variables, tokens)[0, 5:], packed[0, 5:], atol=1e-4)
    # With rotary positions attention is relative: the second document alone gives the same logits.
    np.testing.assert_allclose(packed[0, 5:], apply(variables, tokens[:1, 5:])[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"GPT: segment_ids must have the tokens' shape \(2, 12\)"):
        model.apply(variables, tokens, segment_ids=segments[:, :4])
