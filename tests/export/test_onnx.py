"""ONNX export: each primitive's translation, the digits models and the
trained CNN (float and ONNX Runtime int8) run in onnxruntime against jax."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen

from lepton_jax import models, nn
from lepton_jax.cli import main as cli_main
from lepton_jax.export import export_recipe, load, to_onnx

ort = pytest.importorskip("onnxruntime")

RNG = np.random.default_rng(0)
W = RNG.normal(size=(12, 5)).astype(np.float32)
K = RNG.normal(size=(3, 3, 2, 4)).astype(np.float32)
KG = RNG.normal(size=(3, 3, 1, 4)).astype(np.float32)  # 2 groups of 1 input channel


def _conv(x, kernel, **kwargs):
    return jax.lax.conv_general_dilated(x, kernel, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kwargs)


# (name, function of x [B, 3, 4, 2] float32)
OPS = [
    ("unary", lambda x: jnp.exp(-x) + jnp.tanh(x) + jax.nn.sigmoid(x) + jnp.sqrt(jnp.abs(x)) + jax.lax.rsqrt(x * x + 1)
     + jnp.sin(x) * jnp.cos(x) + jax.scipy.special.erf(x) + jnp.sign(x) + jnp.floor(x) - jnp.ceil(x) + jnp.log1p(x * x)),
    ("binary", lambda x: jnp.maximum(x, 0.5) - jnp.minimum(x, -0.5) * 2.0 / (x * x + 1.0) + jnp.abs(x) ** 1.5),
    ("powers", lambda x: jnp.square(x) + x ** 3 - jnp.log(jnp.abs(x) + 1)),
    ("select_and_cast", lambda x: jnp.where(x > 0, x, 0.1 * x) + (x >= 0.3).astype(jnp.float32)
     + jnp.clip(x, -0.2, 0.4) + (x != 0.5) * (x <= 1.0)),
    ("matmul", lambda x: x.reshape(x.shape[0], -1)[:, :12] @ W),
    ("einsum", lambda x: jnp.einsum("bhwc,bhvc->bhwv", x, x)),
    ("conv", lambda x: _conv(x, K, window_strides=(2, 1), padding="SAME", rhs_dilation=(1, 2))),
    ("grouped_conv", lambda x: _conv(x, KG, window_strides=(1, 1), padding=((1, 0), (2, 1)), feature_group_count=2)),
    ("max_pool", lambda x: nn.max_pool(x, window=(2, 2), strides=(2, 2), padding="SAME")),
    ("broadcast", lambda x: x + jnp.arange(2.0)[None, None, None] + jnp.broadcast_to(x[:, :1], x.shape)),
    ("shapes", lambda x: jnp.concatenate([jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0], 4, 6),
                                          x.reshape(x.shape[0], 4, 6)], axis=1)),
    ("reductions", lambda x: jnp.sum(x, axis=(1, 2)) + jnp.max(x, axis=1).mean(1) - jnp.min(x, axis=2).sum(1)),
    ("softmax_argmax", lambda x: jax.nn.softmax(x.reshape(x.shape[0], -1), axis=-1)
     + jnp.argmax(x.reshape(x.shape[0], -1), axis=-1)[:, None].astype(jnp.float32)),
]


def _run(path, x):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name, fn", OPS, ids=[name for name, _ in OPS])
def test_each_translation_matches_jax_at_any_batch(name, fn, tmp_path):
    path = to_onnx(lambda variables, x: fn(x), {}, np.zeros((1, 3, 4, 2), np.float32), tmp_path / f"{name}.onnx")
    for batch in (1, 5):
        x = RNG.normal(size=(batch, 3, 4, 2)).astype(np.float32)
        np.testing.assert_allclose(_run(path, x), np.asarray(jax.jit(fn)(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", [models.MLPClassifier(), models.CNN()], ids=["mlp", "cnn"])
def test_digits_models_with_their_preprocessing(model, tmp_path):
    example = np.zeros((1, 8, 8, 1), np.float32)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(example)
    # Running statistics that are not the identity, so BatchNorm's inference arithmetic shows.
    variables = jax.tree.map(lambda a: a + 0.2 * np.abs(RNG.normal(size=a.shape)).astype(a.dtype), variables)
    path = to_onnx(lambda v, x: model.apply(v, x, train=False), variables, example, tmp_path / "m.onnx",
                   output_names=("logits",), preprocessing={"normalize": {"mean": 4.9, "std": 6.0}})
    raw = RNG.uniform(0, 16, (13, 8, 8, 1)).astype(np.float32)
    want = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, (raw - 4.9) / 6.0)
    np.testing.assert_allclose(_run(str(path), raw), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_gpt_forward_pass(positions, tmp_path):
    """Embedding gathers, rotary splits, causal attention with its masks, GQA, norms."""
    model = models.GPT(models.GPTConfig(vocab_size=64, max_len=16, num_layers=1, num_heads=4, num_kv_heads=2,
                                        d_model=32, d_ff=64, positions=positions, attention_implementation="xla",
                                        norm_implementation="xla"))
    example = np.zeros((1, 16), np.int32)
    variables = linen.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), example))
    path = to_onnx(lambda v, t: model.apply(v, t), variables, example, tmp_path / "gpt.onnx",
                   input_names=("tokens",), output_names=("logits",))
    for batch in (1, 3):
        tokens = RNG.integers(0, 64, (batch, 16)).astype(np.int32)
        np.testing.assert_allclose(_run(str(path), tokens), np.asarray(jax.jit(model.apply)(variables, tokens)),
                                   rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_what_is_wrong(tmp_path):
    example = np.zeros((1, 3), np.float32)
    with pytest.raises(ValueError, match=r"1 example inputs but input_names \('a', 'b'\)"):
        to_onnx(lambda v, x: x, {}, example, tmp_path / "x.onnx", input_names=("a", "b"))
    with pytest.raises(ValueError, match=r"2 outputs but output_names \('outputs',\)"):
        to_onnx(lambda v, x: (x, x), {}, example, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="unknown preprocessing op 'resize'"):
        to_onnx(lambda v, x: x, {}, example, tmp_path / "x.onnx", preprocessing={"resize": {}})
    with pytest.raises(ValueError, match="has a dimension of 7"):
        to_onnx(lambda v, x: x, {}, np.zeros((1, 7), np.float32), tmp_path / "x.onnx")


def test_an_untranslated_primitive_is_named(tmp_path):
    model = models.LSTMClassifier(features=8)
    example = np.zeros((1, 8, 8, 1), np.float32)
    variables = linen.meta.unbox(jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x))(example))
    with pytest.raises(ValueError, match="the primitive 'scan' has no ONNX translation"):
        to_onnx(lambda v, x: model.apply(v, x), variables, example, tmp_path / "lstm.onnx")


def test_trained_digits_cnn_float_and_int8_on_the_test_split(digits_cnn_run, tmp_path, capsys):
    from recipes import digits

    out = tmp_path / "onnx"
    assert cli_main(["export", "--format", "onnx", "--recipe", "digits", "--ckpt", digits_cnn_run.out,
                     "--out", str(out), "--quantize", "int8"]) == 0
    float_path, int8_path = str(out / "model.onnx"), str(out / "model-int8.onnx")
    assert capsys.readouterr().out.strip() == int8_path and os.path.isfile(float_path)
    _, _, test_split, normalizer = digits.load_splits(0)
    raw = normalizer.inverse(test_split["image"]).astype(np.float32)  # what a client sends
    exported = load(export_recipe("digits", digits_cnn_run.out, tmp_path / "jax", platforms=("cpu",)))
    float_logits = _run(float_path, raw)
    np.testing.assert_allclose(float_logits, np.asarray(exported(raw)), rtol=1e-4, atol=1e-4)
    float_accuracy = (float_logits.argmax(1) == test_split["label"]).mean()
    int8_accuracy = (_run(int8_path, raw).argmax(1) == test_split["label"]).mean()
    print(f"digits CNN test accuracy: onnx float {float_accuracy:.4f}, onnx int8 {int8_accuracy:.4f}; "
          f"file {os.path.getsize(float_path)} -> {os.path.getsize(int8_path)} bytes")
    assert float_accuracy > 0.97 and float_accuracy - int8_accuracy <= 0.01
    assert os.path.getsize(int8_path) < os.path.getsize(float_path) / 3
