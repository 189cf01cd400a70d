"""Post-training int8 quantization: trained digits models keep their test
accuracy (within 0.5 points), the tiny GPT its validation loss (within 2%),
and quantized exports are about 4x smaller and give the quantized outputs."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import checkpoint, data, models, quant
from lepton_jax.export import export_recipe, load
from recipes import digits, gpt


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("digits") / "cnn")
    digits.main(["--model=cnn", "--epochs=8", f"--out={out}", "--progress=false"])
    return out


def _accuracy(apply, split) -> float:
    return float((np.asarray(apply(split["image"])).argmax(-1) == split["label"]).mean())


@pytest.mark.parametrize("mode", quant.MODES)
def test_digits_cnn_keeps_its_accuracy(digits_run, mode):
    train_split, _, test_split, _ = digits.load_splits(0)
    state = checkpoint.restore(os.path.join(digits_run, "checkpoints"))
    model = digits.build_model("cnn")
    variables = {"params": state["params"], **state["model_state"]}
    quantized = quant.quantize(model, variables, test_split["image"][:1], mode=mode,
                               calibration=[train_split["image"][i:i + 64] for i in range(0, 256, 64)])
    int8_leaves = [x for x in jax.tree.leaves(quantized.variables) if x.dtype == jnp.int8]
    assert len(int8_leaves) == 4  # two convolutions and two dense layers
    float_accuracy = _accuracy(lambda x: model.apply(variables, x, train=False), test_split)
    int8_accuracy = _accuracy(quantized.apply, test_split)
    assert float_accuracy > 0.95
    assert float_accuracy - int8_accuracy <= 0.005, (float_accuracy, int8_accuracy)


def test_quantized_export_is_smaller_and_matches(digits_run, tmp_path):
    plain = export_recipe("digits", digits_run, tmp_path / "float", platforms=("cpu",))
    small = export_recipe("digits", digits_run, tmp_path / "int8", platforms=("cpu",), quantize="int8")
    ratio = os.path.getsize(os.path.join(plain, "params.npz")) / os.path.getsize(os.path.join(small, "params.npz"))
    assert ratio > 3.0, ratio
    _, _, test_split, normalizer = digits.load_splits(0)
    raw = normalizer.inverse(test_split["image"][:16])
    loaded = np.asarray(load(small)(raw))
    state = checkpoint.restore(os.path.join(digits_run, "checkpoints"))
    model = digits.build_model("cnn")
    train_split = digits.load_splits(0)[0]
    quantized = quant.quantize(model, {"params": state["params"], **state["model_state"]}, raw[:1], mode="int8",
                               calibration=[train_split["image"][i:i + 64] for i in range(0, 256, 64)])
    np.testing.assert_allclose(loaded, np.asarray(quantized.apply(test_split["image"][:16])), rtol=1e-4, atol=1e-4)
    assert load(small).metadata["quantization"] == "int8"


def test_tiny_gpt_weight_only_keeps_its_loss(tmp_path):
    out = str(tmp_path / "gpt")
    flags = ["--config=tiny", "--batch_size=8", "--seq_len=64", "--max_bytes=200000", "--eval_every=40",
             "--eval_windows=16", "--progress=false", "--steps=40", f"--out={out}"]
    gpt.main(flags)
    run, model, _ = gpt.build(gpt.RunConfig(config="tiny", seq_len=64, batch_size=8))
    params = checkpoint.restore(out, params_only=True)
    tokens = data.load_bytes(max_bytes=200000)
    windows = data.eval_windows(data.split_tokens(tokens, 0.05)[1], 64, 16)

    def loss(apply):
        return float(models.lm_loss(apply(windows["inputs"]), windows))

    full = loss(lambda x: model.apply({"params": params}, x))
    # The transformer blocks; the (tied) embedding stays in float.
    quantized = quant.quantize(model, {"params": params}, windows["inputs"][:1], mode="int8_weight",
                               module_path="block_.*")
    assert sum(x.dtype == jnp.int8 for x in jax.tree.leaves(quantized.variables)) == 4 * 6  # q, k, v, out, in, out
    assert abs(loss(quantized.apply) / full - 1) <= 0.02, (full, loss(quantized.apply))
    with pytest.raises(ValueError, match="supports quantize='int8_weight' only"):
        export_recipe("gpt", out, tmp_path / "m", quantize="int8")


def test_bad_arguments():
    model = models.MLPClassifier()
    x = jnp.zeros((1, 8, 8, 1))
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        quant.quantize(model, variables, x, mode="int4")
    with pytest.raises(ValueError, match="calibration batches"):
        quant.quantize(model, variables, x, mode="int8")


def test_quantization_aware_training_with_fit():
    import optax

    from lepton_jax import train

    train_split, _, test_split, _ = digits.load_splits(0)
    accuracies = {}
    for name, model in (("float", models.MLPClassifier()), ("qat", quant.qat(models.MLPClassifier(), mode="int8"))):
        tx = optax.adam(2e-3)
        state = train.create_train_state(model, tx, train_split["image"][:1])
        if name == "qat":
            assert "quant_stats" in state.model_state  # activation ranges, updated by the train step
        loss = train.classification_loss()
        result = train.fit(state, train.make_train_step(model, tx, loss), data.BatchIterator(train_split, 64),
                           num_steps=300, progress=False, eval_step=train.make_eval_step(model, loss, num_classes=10),
                           eval_data=test_split, eval_every=300)
        accuracies[name] = result.eval_metrics["accuracy"]
        if name == "qat":
            deployed = quant.quantize(models.MLPClassifier(), {"params": result.state.params}, train_split["image"][:1],
                                      mode="int8", calibration=[train_split["image"][:128]])
            accuracies["qat_int8"] = _accuracy(deployed.apply, test_split)
    assert accuracies["float"] > 0.95
    assert accuracies["qat"] >= accuracies["float"] - 0.01 and accuracies["qat_int8"] >= accuracies["float"] - 0.01, \
        accuracies
