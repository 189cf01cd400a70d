"""Post-training int8 quantization: trained digits models keep their test
accuracy (within 0.5 points), the nano GPT its validation loss (within 2%),
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
def digits_run(digits_cnn_run):
    return digits_cnn_run.out  # the recipe's default CNN, trained once for the suite (read only here)


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


@pytest.fixture(scope="module")
def gpt_run(nano_gpt_run):
    return nano_gpt_run.out  # 40 nano-GPT steps with 64-byte windows, trained once for the suite


def _run_config(run_dir: str) -> gpt.RunConfig:
    with checkpoint.CheckpointManager(os.path.join(run_dir, "checkpoints"), async_save=False) as manager:
        return gpt.RunConfig(**manager.extra()["config"])


@pytest.mark.parametrize("mode", quant.MODES)
def test_nano_gpt_keeps_its_loss(gpt_run, mode):
    run, model, _ = gpt.build(_run_config(gpt_run))
    assert run.seq_len == 64
    params = checkpoint.restore(gpt_run, params_only=True)
    train_tokens, val_tokens = data.split_tokens(data.load_bytes(max_bytes=run.max_bytes), 0.05)  # the run's split
    windows = data.eval_windows(val_tokens, 64, 16)

    def loss(apply):
        return float(models.lm_loss(jax.jit(apply)(windows["inputs"]), windows))

    full = loss(lambda x: model.apply({"params": params}, x))
    calibration = data.eval_windows(train_tokens, 64, 16)["inputs"].reshape(2, 8, 64)
    # The blocks' projections and MLPs; the (tied) embedding and the
    # activation x activation products inside attention stay in float.
    quantized = quant.quantize(model, {"params": params}, windows["inputs"][:1], mode=mode, calibration=calibration,
                               module_path=models.GPT_QUANTIZED_MODULES, act_batch_axes=(0, 1), apply_kwargs={})
    int8_leaves = sum(x.dtype == jnp.int8 for x in jax.tree.leaves(quantized.variables))
    assert int8_leaves == model.config.num_layers * 6 == 12  # per block: q, k, v, out, mlp in, mlp out
    assert abs(loss(quantized.apply) / full - 1) <= 0.02, (full, loss(quantized.apply))
    # One static scale per activation: other batch sizes and lengths work.
    assert jax.jit(quantized.apply)(windows["inputs"][:3, :17]).shape == (3, 17, 256)


def test_nano_gpt_int8_export_matches_the_quantized_model(gpt_run, tmp_path):
    path = export_recipe("gpt", gpt_run, tmp_path / "m", platforms=("cpu",), quantize="int8")
    loaded = load(path)
    assert loaded.metadata["quantization"] == "int8"
    run, model, _ = gpt.build(_run_config(gpt_run))
    tokens = data.eval_windows(data.split_tokens(data.load_bytes(max_bytes=run.max_bytes), 0.05)[1], 64, 2)["inputs"]
    float_logits = model.apply({"params": checkpoint.restore(gpt_run, params_only=True)}, tokens)
    int8_logits = np.asarray(loaded(tokens))
    assert int8_logits.shape == float_logits.shape
    # Close to the float model (int8 rounding), and not identical to it.
    np.testing.assert_allclose(int8_logits, float_logits, atol=0.5)
    assert np.abs(int8_logits - float_logits).max() > 1e-4
    # Its KV-cache decode step uses the same int8 weights and static scales:
    # greedy generation equals greedy decoding with the exported whole model
    # (causal: the logits at a position ignore the padding after it).
    sequence = [int(t) for t in tokens[0, :5]]
    for _ in range(6):
        padded = np.zeros((1, 64), np.int32)
        padded[0, :len(sequence)] = sequence
        sequence.append(int(np.asarray(loaded(padded))[0, len(sequence) - 1].argmax()))
    assert list(loaded.generator.stream(sequence[:5], 6, temperature=0.0)) == sequence[5:]


def test_bad_arguments():
    model = models.MLPClassifier()
    x = jnp.zeros((1, 8, 8, 1))
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        quant.quantize(model, variables, x, mode="int4")
    with pytest.raises(ValueError, match="calibration batches"):
        quant.quantize(model, variables, x, mode="int8")
    with pytest.raises(ValueError, match=r"act_batch_axes must be distinct non-negative ints .* got \(0, -1\)"):
        quant.quantize(model, variables, x, mode="int8", calibration=[x], act_batch_axes=(0, -1))


@pytest.mark.slow
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
        hooks = train.default_hooks(eval_step=train.make_eval_step(model, loss, num_classes=10, input_key="image"),
                                    eval_data=test_split, eval_every=300, progress=False)
        result = train.fit(state, train.make_train_step(model, tx, loss, input_key="image"), data.BatchIterator(train_split, 64),
                           num_steps=300, hooks=hooks)
        accuracies[name] = result.eval_metrics["accuracy"]
        if name == "qat":
            deployed = quant.quantize(models.MLPClassifier(), {"params": result.state.params}, train_split["image"][:1],
                                      mode="int8", calibration=[train_split["image"][:128]])
            accuracies["qat_int8"] = _accuracy(deployed.apply, test_split)
    assert accuracies["float"] > 0.95
    assert accuracies["qat"] >= accuracies["float"] - 0.01 and accuracies["qat_int8"] >= accuracies["float"] - 0.01, \
        accuracies
