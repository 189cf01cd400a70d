"""Context parallelism on 8 simulated CPU devices: ring attention over a ``seq``
mesh axis equals one-device attention (outputs and gradients; causal, packed
segments; the XLA and Pallas blocks), a GPT on ``seq=4, data=2`` trains like
one device with no extra flag, and the compiled memory per device falls with
the ``seq`` axis."""

from __future__ import annotations

import functools

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import models, ops, parallel


def _in_mesh(axes, rules="data"):
    mesh = parallel.make_mesh(axes, devices=jax.devices()[:int(np.prod(list(axes.values())))])
    return mesh, parallel.restrict_to_mesh(parallel.get_rules(rules), mesh)


def _qkv(B=2, S=32, H=4, K=2, D=8, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (B, S, H, D))
    k = jax.random.normal(keys[1], (B, S, K, D))
    v = jax.random.normal(keys[2], (B, S, K, D))
    weights = jax.random.normal(keys[3], (B, S, H, D))  # a loss that weighs every output
    return q, k, v, weights


# Three packed documents whose borders fall inside the devices' blocks (S=32 over 4: blocks of 8).
SEGMENTS = np.repeat(np.array([[0] * 5 + [1] * 20 + [2] * 7]), 2, 0).astype(np.int32)


@pytest.mark.parametrize("causal, segments, implementation", [
    (True, SEGMENTS, "xla"),
    (True, None, "xla"),
    (False, SEGMENTS, "xla"),
    (True, SEGMENTS, "pallas"),  # the flash kernel (interpret mode) computes every block
])
def test_ring_attention_equals_one_device(causal, segments, implementation, monkeypatch):
    monkeypatch.setenv("LEPTON_PALLAS_BACKEND", "gpu")
    q, k, v, weights = _qkv()

    def loss(attend, q, k, v):
        out = attend(q, k, v, causal=causal, segment_ids=segments, implementation=implementation)
        return jnp.sum(out * weights), out

    reference = jax.value_and_grad(functools.partial(loss, ops.attention), argnums=(0, 1, 2), has_aux=True)
    (_, want), want_grads = reference(q, k, v)
    mesh, rules = _in_mesh({"data": 2, "seq": 4})
    ring = jax.jit(jax.value_and_grad(functools.partial(loss, ops.sequence_parallel_attention), argnums=(0, 1, 2),
                                      has_aux=True))
    with jax.set_mesh(mesh), linen.logical_axis_rules(rules):
        assert ops.sequence_axis() == "seq"
        compiled = ring.trace(q, k, v).lower().compile()
    (_, got), grads = compiled(q, k, v)
    assert "collective-permute" in compiled.as_text()  # key/value blocks travel round the ring
    assert got.sharding.spec[:2] == ("data", "seq")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for name, g, w in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_ring_attention_errors():
    q, k, v, _ = _qkv(S=30)
    mesh, rules = _in_mesh({"data": 2, "seq": 4})
    with jax.set_mesh(mesh), linen.logical_axis_rules(rules):
        with pytest.raises(ValueError, match=r"sequence length 30 does not divide over mesh axis 'seq' of size 4"):
            jax.jit(ops.sequence_parallel_attention).trace(q, k, v)
    with pytest.raises(ValueError, match="no mesh axis of size > 1 holds 'seq'"):
        ops.sequence_parallel_attention(q, k, v)
    assert ops.sequence_axis() is None
    with pytest.raises(ValueError, match="give both q_segment_ids and kv_segment_ids, or neither"):
        ops.ring_attention(q, k, v, axis_name="seq", q_segment_ids=SEGMENTS[:, :30])
    mesh, rules = _in_mesh({"data": 8})  # the rules name seq, but this mesh has no such axis
    with jax.set_mesh(mesh), linen.logical_axis_rules(rules):
        assert ops.sequence_axis() is None


# One block: the ring runs inside each block's attention, so a second block
# repeats the same sharded program (half the compile time of this file's GPT
# checks); its gradients still go back through the ring to the embedding.
CONFIG = models.GPTConfig(vocab_size=64, max_len=64, num_layers=1, num_heads=4, num_kv_heads=2, d_model=32, d_ff=64,
                          positions="rotary", mlp="swiglu")


def _gpt_loss_and_grads(axes, tokens, segments, config=CONFIG, compile_only=False):
    model = models.GPT(config)

    def init():
        return linen.meta.unbox(model.init(jax.random.PRNGKey(0), tokens[:, :-1])["params"])

    params = jax.eval_shape(init) if compile_only else jax.jit(init)()  # compiling needs only the shapes
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments}

    def loss(params, batch):
        return models.lm_loss(model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"]), batch)

    step = jax.jit(jax.value_and_grad(loss))
    if axes is None:
        compiled = step.trace(params, batch).lower().compile()
        return (None if compile_only else compiled(params, batch)), compiled
    mesh, rules = _in_mesh(axes)
    with jax.set_mesh(mesh), linen.logical_axis_rules(rules):
        sharded = parallel.shard_batch(batch, mesh, rules)
        compiled = step.trace(params, sharded).lower().compile()
    return (None if compile_only else compiled(params, sharded)), compiled


@pytest.mark.slow
def test_gpt_on_a_seq_axis_matches_one_device_and_needs_less_memory_per_device():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, size=(4, 65)).astype(np.int32)
    segments = np.repeat(np.array([[0] * 20 + [1] * 44]), 4, 0).astype(np.int32)
    (want_loss, want_grads), _ = _gpt_loss_and_grads(None, tokens, segments)
    (loss, grads), compiled = _gpt_loss_and_grads({"seq": 4, "data": 2}, tokens, segments)
    assert "collective-permute" in compiled.as_text()
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    for path, want in jax.tree_util.tree_leaves_with_path(want_grads):
        got = functools.reduce(lambda tree, key: tree[key.key], path, grads)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))

    # Long sequences: the activations and scores each device holds fall with the seq axis.
    long_config = models.GPTConfig(vocab_size=64, max_len=1024, num_layers=1, num_heads=4, d_model=32, d_ff=64,
                                   positions="rotary")
    tokens = rng.integers(0, 64, size=(2, 1025)).astype(np.int32)
    segments = np.zeros((2, 1024), np.int32)
    temp = {}
    for seq in (1, 4):
        _, compiled = _gpt_loss_and_grads({"seq": seq, "data": 2}, tokens, segments, long_config, compile_only=True)
        temp[seq] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[4] < 0.4 * temp[1], temp  # roughly 1/4 (parameters and the ring's buffers stay)


def test_bert_encoder_on_a_seq_axis_matches_one_device():
    """The encoder's padded, non-causal attention (key mask as segment ids)
    takes the ring too: hidden states as on one device."""
    config = models.BertConfig(vocab_size=50, max_len=32, num_layers=1, num_heads=2, d_model=16, d_ff=32,
                               pooler=False)
    model = models.BertEncoder(config)
    ids = np.random.default_rng(0).integers(5, 50, size=(2, 32)).astype(np.int32)
    mask = np.ones((2, 32), np.int32)
    mask[0, 19:] = 0  # the padding begins inside the third device's block
    mask[1, 9:] = 0  # and inside the second, so whole key blocks are masked for every query
    params = jax.jit(model.init)(jax.random.PRNGKey(0), ids, attention_mask=mask)
    want = model.apply(params, ids, attention_mask=mask)
    mesh, rules = _in_mesh({"data": 2, "seq": 4})
    with jax.set_mesh(mesh), linen.logical_axis_rules(rules):
        compiled = jax.jit(lambda p, i, m: model.apply(p, i, attention_mask=m)).trace(params, ids, mask).lower().compile()
    assert "collective-permute" in compiled.as_text()
    got = compiled(params, ids, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
