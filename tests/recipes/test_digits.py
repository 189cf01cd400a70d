"""The digits recipe end to end: outputs, report, resume, and the accuracy bar."""

from __future__ import annotations

import json
import os

import pytest

from recipes import digits


@pytest.mark.slow
def test_short_run_writes_every_output_and_resumes(tmp_path):
    out = str(tmp_path / "mlp")
    args = ["--model=mlp", "--epochs=2", "--eval_every_epochs=1", f"--out={out}", "--progress=false"]
    results = digits.main(args)
    for name in ("metrics.jsonl", "curves.png", "report.txt", "results.json", "tensorboard", "checkpoints"):
        assert os.path.exists(os.path.join(out, name)), name
    report = open(os.path.join(out, "report.txt")).read()
    assert "precision" in report and "macro" in report and report.count("\n") >= 12
    assert json.load(open(os.path.join(out, "results.json")))["test_accuracy"] == results["test_accuracy"]
    assert results["test_accuracy"] > 0.5  # two epochs: well above chance (0.1), far from converged
    # Asking for more epochs with --resume continues from the saved step.
    more = digits.main([*args[:1], "--epochs=3", *args[2:], "--resume"])
    assert more["resumed_from"] == results["steps"] and more["steps"] > results["steps"]


def test_bad_model_name_is_rejected():
    with pytest.raises(ValueError, match=r"--model must be one of \('mlp', 'cnn', 'lstm'\), got 'vgg'"):
        digits.main(["--model=vgg"])


# The bar: each model reaches >= 97% test accuracy (CNN >= 98%) within
# two minutes on two CPU cores. These run the real recipe with its defaults
# (each takes about ten seconds here, so they run in the default suite). The
# CNN's is the suite's shared run, which other tests read too.
@pytest.mark.compute_bound
@pytest.mark.slow
@pytest.mark.parametrize("model, bar", [("mlp", 0.97), ("cnn", 0.98), ("lstm", 0.97)])
def test_default_recipe_reaches_the_accuracy_bar(tmp_path, model, bar, request):
    if model == "cnn":
        results = request.getfixturevalue("digits_cnn_run").result
        assert results["config"]["epochs"] == 30 and results["config"]["model"] == "cnn"  # the defaults
    else:
        results = digits.main([f"--model={model}", f"--out={tmp_path}", "--progress=false"])
    assert results["test_accuracy"] >= bar
    assert results["train_seconds"] < 120


@pytest.mark.slow
def test_the_grain_loader_trains_the_mlp_as_well(tmp_path):
    from lepton_jax import checkpoint

    results = digits.main(["--model=mlp", "--loader=grain", "--epochs=10", f"--out={tmp_path}", "--progress=false"])
    assert results["test_accuracy"] >= 0.9 and results["steps"] == 10 * (1266 // 64)  # a quarter of the default run
    with checkpoint.CheckpointManager(str(tmp_path / "checkpoints"), async_save=False) as manager:
        assert "grain" in manager.extra()["data"]  # the loader's position, for resume
