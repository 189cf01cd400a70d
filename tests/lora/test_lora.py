"""LoRA adapters: against hand-written merges and einsums, gradients, training
through train.make_train_step, frozen bf16/int8 bases, files and errors."""

from __future__ import annotations

import json

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lepton_jax import lora, models, nn, parallel, quant, train

GPT_CONFIG = models.GPTConfig(vocab_size=32, max_len=16, num_layers=1, num_heads=2, d_model=16, d_ff=32)
E, H, D, F = 16, 2, 8, 32
PATTERN = r"attention/(query|out)|mlp/w_in"
CONFIG = lora.LoRAConfig(pattern=PATTERN, rank=4, alpha=8.0)  # scale 2
MODEL = models.GPT(GPT_CONFIG)
LORA = lora.LoRA(MODEL, CONFIG)
TOKENS = np.random.default_rng(7).integers(0, 32, (2, 8)).astype(np.int32)
BATCH = {"inputs": TOKENS, "targets": np.roll(TOKENS, -1, axis=1)}

gpt_forward = jax.jit(lambda params, tokens: MODEL.apply({"params": params}, tokens))
lora_forward = jax.jit(lambda variables, tokens: LORA.apply(variables, tokens))


@pytest.fixture(scope="module")
def params():
    """The GPT's params, drawn in numpy from their shapes (compiling the GPT's init costs a second)."""
    shapes = linen.meta.unbox(jax.eval_shape(MODEL.init, jax.random.PRNGKey(0), TOKENS)["params"])
    rng = np.random.default_rng(0)
    # Weights of std 0.1 (a clear signal for the gradients), 1-D scales and biases near 1.
    draw = lambda s: 0.1 * rng.normal(size=s.shape) + (len(s.shape) < 2)  # noqa: E731
    return jax.tree.map(lambda s: jnp.asarray(draw(s), jnp.float32), shapes)


@pytest.fixture(scope="module")
def axes():
    return parallel.param_logical_axes(MODEL, TOKENS)


@pytest.fixture(scope="module")
def fresh_adapters(params, axes):
    """``lora.init``'s adapters (one compiled program rather than one per op and shape)."""
    return jax.jit(lambda params: lora.init(jax.random.PRNGKey(1), params, CONFIG, logical_axes=axes))(params)


@pytest.fixture(scope="module")
def adapters(fresh_adapters):
    """Adapters with random ``b`` (init's are zero), so the delta is nonzero."""
    rng = np.random.default_rng(2)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(0.1 * rng.normal(size=x.shape), jnp.float32) if path[-1].key == "b" else x,
        fresh_adapters)


def reference_merge(params, adapters, scale):
    """W + scale * a @ b written out per projection, with the shapes of the GPT's kernels."""
    merged = jax.tree.map(lambda x: x, params)
    attention, mlp = adapters["block_0"]["attention"], adapters["block_0"]["mlp"]
    reshape = {("attention", "query"): (attention["query"], (E, H, D)),  # inputs: embed
               ("attention", "out"): (attention["out"], (H, D, E)),  # inputs: heads x head_dim
               ("mlp", "w_in"): (mlp["w_in"], (E, F))}
    for (module, name), (pair, shape) in reshape.items():
        w = params["block_0"][module][name]
        merged["block_0"][module][name] = w + scale * (pair["a"] @ pair["b"]).reshape(shape)
    return merged


def _variables(base, adapters):
    return {"params": adapters, lora.BASE_COLLECTION: base}


@pytest.mark.parametrize("kwargs, message", [
    ({"pattern": "(", "rank": 4}, r"pattern '\(' is not a valid regex"),
    ({"pattern": "x", "rank": 0}, "rank must be an int >= 1"),
    ({"pattern": "x", "rank": 2.0}, "rank must be an int >= 1"),
    ({"pattern": "x", "alpha": 0.0}, "alpha must be > 0"),
    ({"pattern": "x", "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"pattern": "x", "dropout": -0.1}, r"dropout must be in \[0, 1\)"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=f"LoRAConfig: {message}"):
        lora.LoRAConfig(**kwargs)
    assert lora.LoRAConfig(pattern="x", rank=4, alpha=6.0).scale == 1.5


def test_quantize_int8_error_is_at_most_half_a_step():
    x = np.random.default_rng(0).normal(size=(3, 5, 6)).astype(np.float32)
    x[..., 2] = 0.0  # an all-zero channel
    w = jax.jit(quant.quantize_int8)(x)
    assert w.values.dtype == jnp.int8 and w.scale.shape == (6,) and w.scale[2] == 0
    np.testing.assert_allclose(w.scale, np.abs(x).max(axis=(0, 1)) / 127, rtol=1e-6)
    error = np.abs(np.asarray(jax.jit(quant.dequantize)(w)) - x)
    assert np.all(error <= np.asarray(w.scale) / 2 * (1 + 1e-6) + 1e-12)
    with pytest.raises(ValueError, match="quantize_int8: x must have at least 2 dims"):
        quant.quantize_int8(np.ones(3, np.float32))


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_freeze_round_trips_within_the_storage_error(params, adapters, dtype):
    frozen = jax.jit(lora.freeze, static_argnums=1)(params, dtype)
    for (path, w), stored in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, quant.Int8Weight))):
        w = np.asarray(w)
        if w.ndim < 2:
            assert stored.dtype == jnp.float32 and np.array_equal(stored, w), path
        elif dtype == "int8":
            assert isinstance(stored, quant.Int8Weight) and stored.values.shape == w.shape, path
            values, scale_O = np.asarray(stored.values, np.float32), np.asarray(stored.scale)
            assert np.all(np.abs(values * scale_O - w) <= scale_O / 2 * (1 + 1e-6)), path
        else:
            assert stored.dtype == jnp.bfloat16, path
            np.testing.assert_allclose(np.asarray(stored, np.float32), w, rtol=2 ** -8, atol=0)
    # Merged from a frozen base: adapted weights in float32 near the float merge, int8 leaves dequantized.
    merged = jax.jit(lora.merge, static_argnums=2)(frozen, adapters, CONFIG)
    float_merged = reference_merge(params, adapters, CONFIG.scale)
    query, w_out = merged["block_0"]["attention"]["query"], merged["block_0"]["mlp"]["w_out"]
    assert query.dtype == jnp.float32 and w_out.dtype == (jnp.float32 if dtype == "int8" else jnp.bfloat16)
    np.testing.assert_allclose(query, float_merged["block_0"]["attention"]["query"], atol=2e-3)
    with pytest.raises(ValueError, match="lora.freeze: dtype must be one of"):
        lora.freeze(params, "float16")


def test_init_shapes_follow_the_logical_axes(params, fresh_adapters):
    with_axes = fresh_adapters
    attention = with_axes["block_0"]["attention"]
    assert attention["query"]["a"].shape == (E, 4) and attention["query"]["b"].shape == (4, H * D)
    assert attention["out"]["a"].shape == (H * D, 4) and attention["out"]["b"].shape == (4, E)
    assert with_axes["block_0"]["mlp"]["w_in"]["b"].shape == (4, F)
    assert all(not np.any(pair["b"]) and np.all(np.abs(pair["a"]) <= 1 / np.sqrt(pair["a"].shape[0]))
               for pair in [attention["query"], attention["out"]])
    # Without axes the first dim is the input: out (H, D, E) -> (H, D * E).
    plain = jax.eval_shape(lambda: lora.init(jax.random.PRNGKey(1), params, CONFIG))
    assert plain["block_0"]["attention"]["out"]["a"].shape == (H, 4)
    assert train.count_params(with_axes) == 4 * (E + H * D) + 4 * (H * D + E) + 4 * (E + F)


def test_init_errors(params, axes):
    with pytest.raises(ValueError, match=r"pattern 'final_norm' matches no parameter with >= 2 dims.*embedding"):
        lora.init(jax.random.PRNGKey(0), params, lora.LoRAConfig(pattern="final_norm"))  # 1-D scale and bias only
    axes_without_query = jax.tree.map(lambda x: x, axes)
    del axes_without_query["block_0"]["attention"]["query"]
    with pytest.raises(ValueError, match="logical_axes has no entry for 'block_0/attention/query'"):
        lora.init(jax.random.PRNGKey(0), params, CONFIG, logical_axes=axes_without_query)


def test_fresh_adapters_leave_the_outputs_bitwise_unchanged(params, fresh_adapters):
    np.testing.assert_array_equal(lora_forward(_variables(params, fresh_adapters), TOKENS),
                                  gpt_forward(params, TOKENS))


def test_apply_equals_the_reference_merge(params, adapters):
    reference = reference_merge(params, adapters, CONFIG.scale)
    logits = lora_forward(_variables(params, adapters), TOKENS)
    np.testing.assert_allclose(logits, gpt_forward(reference, TOKENS), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gpt_forward(lora.merge(params, adapters, CONFIG), TOKENS), logits,
                               rtol=1e-6, atol=1e-6)
    assert not np.allclose(logits, gpt_forward(params, TOKENS), atol=1e-3)
    # The out projection (inputs heads x head_dim): x . W' = x . W + scale * (x . a) . b.
    merged_out_HxDxE = lora.merge(params, adapters, CONFIG)["block_0"]["attention"]["out"]
    pair = adapters["block_0"]["attention"]["out"]
    x_BxSxHxD = jax.random.normal(jax.random.PRNGKey(3), (2, 5, H, D))
    low_rank_BxSxE = (x_BxSxHxD.reshape(2, 5, H * D) @ pair["a"]) @ pair["b"]
    expected_BxSxE = jnp.einsum("bshd,hde->bse", x_BxSxHxD, params["block_0"]["attention"]["out"]) \
        + CONFIG.scale * low_rank_BxSxE
    np.testing.assert_allclose(jnp.einsum("bshd,hde->bse", x_BxSxHxD, merged_out_HxDxE), expected_BxSxE,
                               rtol=1e-5, atol=1e-6)


def test_gradients_match_the_chain_rule_and_skip_the_base(params, adapters):
    """d loss / d a = scale * G @ b.T and d loss / d b = scale * a.T @ G, with G the gradient
    of the plain model's loss at the merged weight, reshaped (inputs, outputs)."""
    def loss_through_lora(adapters, base):
        return models.lm_loss(LORA.apply(_variables(base, adapters), TOKENS), BATCH)

    def plain_loss(params):
        return models.lm_loss(MODEL.apply({"params": params}, TOKENS), BATCH)

    grads_of = jax.jit(lambda adapters, base, merged: (jax.grad(loss_through_lora, argnums=(0, 1))(adapters, base),
                                                       jax.grad(plain_loss)(merged)))
    (grads, base_grads), weight_grads = grads_of(adapters, params, reference_merge(params, adapters, CONFIG.scale))
    assert all(not np.any(g) for g in jax.tree.leaves(base_grads))
    for module, name, inputs in [("attention", "query", E), ("attention", "out", H * D), ("mlp", "w_in", E)]:
        pair, got = adapters["block_0"][module][name], grads["block_0"][module][name]
        g_IxO = np.asarray(weight_grads["block_0"][module][name], np.float64).reshape(inputs, -1)
        a_IxR, b_RxO = np.asarray(pair["a"], np.float64), np.asarray(pair["b"], np.float64)
        assert np.abs(g_IxO).max() > 1e-4
        np.testing.assert_allclose(got["a"], CONFIG.scale * g_IxO @ b_RxO.T, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(got["b"], CONFIG.scale * a_IxR.T @ g_IxO, rtol=1e-4, atol=1e-7)


def test_train_steps_on_an_int8_base_lower_the_loss_and_keep_the_base(params, axes):
    tx = optax.adam(3e-2)
    state = lora.create_train_state(LORA, params, tx, seed=0, logical_axes=axes, base_dtype="int8")
    base = state.model_state[lora.BASE_COLLECTION]
    assert isinstance(base["block_0"]["attention"]["query"], quant.Int8Weight)
    step = train.make_train_step(LORA, tx, models.lm_loss, input_key="inputs")
    losses = []
    for _ in range(4):
        state, metrics = step(state, BATCH)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.01, losses
    assert jax.tree.structure(state.model_state[lora.BASE_COLLECTION]) == jax.tree.structure(base)
    for kept, before in zip(jax.tree.leaves(state.model_state[lora.BASE_COLLECTION]), jax.tree.leaves(base)):
        assert kept.dtype == before.dtype and np.array_equal(kept, before)
    # Adam's two moments for the adapters and a step count: nothing of the base's size.
    assert train.count_params(state.opt_state) == 2 * train.count_params(state.params) + 1


def test_dropout_drops_whole_input_rows_of_a(params, adapters):
    config = lora.LoRAConfig(pattern=PATTERN, rank=4, alpha=8.0, dropout=0.5)
    plain = lora.merge(params, adapters, config)
    dropped = [lora.merge(params, adapters, config, dropout_key=jax.random.PRNGKey(k)) for k in (0, 1)]
    assert not np.array_equal(dropped[0]["block_0"]["mlp"]["w_in"], dropped[1]["block_0"]["mlp"]["w_in"])
    for module, name in [("attention", "query"), ("attention", "out"), ("mlp", "w_in")]:
        w = params["block_0"][module][name]
        inputs = E if name != "out" else H * D
        full_IxO = np.asarray(plain["block_0"][module][name] - w).reshape(inputs, -1)
        drop_IxO = np.asarray(dropped[0]["block_0"][module][name] - w).reshape(inputs, -1)
        kept_I = np.abs(drop_IxO).max(axis=1) > 0
        assert 0 < kept_I.sum() < inputs, (name, kept_I)  # p = 0.5 over 16 rows
        np.testing.assert_allclose(drop_IxO[kept_I], 2 * full_IxO[kept_I], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(plain["block_0"]["mlp"]["w_out"], dropped[0]["block_0"]["mlp"]["w_out"])


def test_dropout_only_in_training_on_any_linen_model():
    model = nn.MLP(features=(8, 3))
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(1), x)["params"]
    base = jax.tree.map(lambda s: jnp.full(s.shape, 0.3), shapes)
    config = lora.LoRAConfig(pattern="kernel", rank=2, dropout=0.5)
    adapter_shapes = jax.eval_shape(lambda: lora.init(jax.random.PRNGKey(2), base, config))
    adapters = jax.tree.map(lambda s: jnp.ones(s.shape), adapter_shapes)
    wrapped, rngs = lora.LoRA(model, config), {"dropout": jax.random.PRNGKey(3)}

    @jax.jit
    def outputs(variables, rngs):
        merged = lora.merge(variables[lora.BASE_COLLECTION], variables["params"], config)
        return (model.apply({"params": merged}, x),
                wrapped.apply(variables, x, train=False, rngs=rngs),
                wrapped.apply(variables, x, train=True, rngs=rngs),
                wrapped.apply(variables, x, mutable=[lora.BASE_COLLECTION]))

    no_dropout, evaluation, training, (out, updates) = outputs(_variables(base, adapters), rngs)
    np.testing.assert_array_equal(evaluation, no_dropout)
    np.testing.assert_array_equal(out, no_dropout)
    assert not np.allclose(training, no_dropout)
    assert jax.tree.structure(updates) == jax.tree.structure({lora.BASE_COLLECTION: base})
    with pytest.raises(ValueError, match=r"LoRA.apply: dropout 0.5 with train=True needs rngs"):
        wrapped.apply(_variables(base, adapters), x, train=True)
    with pytest.raises(ValueError, match="LoRA.apply: variables must hold 'params'"):
        wrapped.apply({"params": adapters}, x)


def test_merge_errors(params, adapters):
    stray = {**adapters, "head": {"a": jnp.ones((E, 4)), "b": jnp.ones((4, 32))}}
    with pytest.raises(ValueError, match=r"lora.merge: adapters for \['head'\] have no parameter"):
        lora.merge(params, stray, CONFIG)
    wrong = jax.tree.map(lambda x: x, adapters)
    wrong["block_0"]["mlp"]["w_in"]["b"] = jnp.ones((4, 33))
    with pytest.raises(ValueError, match=r"adapter 'block_0/mlp/w_in' has a \(16, 4\) and b \(4, 33\).*\(16, 32\)"):
        lora.merge(params, wrong, CONFIG)
    with pytest.raises(ValueError, match="adapter 'block_0/mlp/w_in' must hold both 'a' and 'b'"):
        lora.merge(params, {"block_0": {"mlp": {"w_in": {"a": jnp.ones((E, 4))}}}}, CONFIG)


def test_save_and_load_adapters(tmp_path, adapters):
    lora.save_adapters(tmp_path / "run", adapters, CONFIG, metadata={"base": "/models/gpt"})
    loaded, config, metadata = lora.load_adapters(tmp_path / "run")
    assert config == CONFIG and metadata == {"base": "/models/gpt"}
    assert jax.tree.structure(loaded) == jax.tree.structure(adapters)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(adapters)):
        assert got.dtype == want.dtype and np.array_equal(got, want)

    with pytest.raises(FileNotFoundError, match="load_adapters: .*missing/adapter_config.json not found"):
        lora.load_adapters(tmp_path / "missing")
    config_file = tmp_path / "run" / lora.CONFIG_FILE
    config_file.write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        lora.load_adapters(tmp_path / "run")
    config_file.write_text(json.dumps({"pattern": "x", "rank": 0, "alpha": 1.0, "dropout": 0.0, "metadata": {}}))
    with pytest.raises(ValueError, match="adapter_config.json holds an invalid config: LoRAConfig: rank"):
        lora.load_adapters(tmp_path / "run")
    config_file.write_text(json.dumps({"pattern": "x", "rank": 8, "alpha": 1.0, "dropout": 0.0, "metadata": {}}))
    with pytest.raises(ValueError, match=r"adapters.safetensors: adapter '.*' must be float32 of rank 8"):
        lora.load_adapters(tmp_path / "run")
    (tmp_path / "run" / lora.ADAPTERS_FILE).write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="adapters.safetensors is not a readable safetensors file"):
        lora.load_adapters(tmp_path / "run")
    with pytest.raises(ValueError, match="save_adapters: metadata must be JSON-serializable"):
        lora.save_adapters(tmp_path / "other", adapters, CONFIG, metadata={"x": object()})
