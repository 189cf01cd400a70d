"""lepton_jax.export: recipe checkpoints to versioned jax.export model
directories, loaded back with jax and numpy only and checked against the
in-framework ``model.apply`` at two batch sizes (the batch is symbolic)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lepton_jax import checkpoint, cli, data, models
from lepton_jax.export import export_model, export_recipe, list_versions, load
from recipes import digits, gpt



@pytest.fixture(scope="module")
def digits_run(digits_cnn_run) -> str:
    return digits_cnn_run.out  # the recipe's default CNN, trained once for the suite (read only here)


@pytest.fixture(scope="module")
def digits_export(digits_run, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("digits_model"))
    export_recipe("digits", digits_run, out)
    return out


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return data.load_digits()["image"][:40]


def digits_reference(run_dir: str, images_BxHxWxC: np.ndarray) -> np.ndarray:
    """The CNN applied in-framework, on images normalized as the recipe does."""
    manager = checkpoint.CheckpointManager(os.path.join(run_dir, "checkpoints"), async_save=False)
    with manager:
        extra = manager.extra()
    state = checkpoint.restore(run_dir)
    model = digits.build_model(extra["config"]["model"])
    normalizer = data.Normalizer.from_dict(extra["normalizer"])
    variables = {"params": state["params"], **state["model_state"]}
    return np.asarray(model.apply(variables, normalizer(images_BxHxWxC), train=False))


def test_digits_export_matches_model_at_two_batch_sizes(digits_run, digits_export, images):
    model = load(digits_export)
    assert model.version == 1 and model.platform == "cpu"
    for batch in (3, 17):
        expected = digits_reference(digits_run, images[:batch])
        logits = model(images[:batch])
        assert logits.shape == (batch, 10)
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)

    # preprocess=False takes inputs already normalized.
    normalizer = data.Normalizer.from_dict(model.signature["preprocessing"]["normalize"])
    np.testing.assert_allclose(model(normalizer(images[:5]), preprocess=False), model(images[:5]), rtol=1e-6)

    signature = model.signature
    assert signature["inputs"] == [{"name": "images", "dtype": "float32", "shape": ["b", 8, 8, 1]}]
    assert signature["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["b", 10]}]
    assert signature["platforms"] == ["cpu", "cuda", "tpu"]  # cuda and tpu lowered on this CPU machine
    assert {p["path"] for p in signature["params"]} >= {"params/Conv_0/kernel", "batch_stats/BatchNorm_0/mean"}
    with checkpoint.CheckpointManager(os.path.join(digits_run, "checkpoints"), async_save=False) as manager:
        step, extra = manager.latest_step(), manager.extra()
    assert signature["preprocessing"]["normalize"]["mean"] == pytest.approx(extra["normalizer"]["mean"])
    metadata = model.metadata
    assert metadata["version"] == 1 and metadata["recipe"] == "digits"
    assert metadata["source"] == {"checkpoint_dir": os.path.join(digits_run, "checkpoints"), "step": step}
    assert 0.0 <= metadata["metrics"]["accuracy"] <= 1.0
    assert metadata["libraries"]["jax"] == jax.__version__ and "flax" in metadata["libraries"]
    assert metadata["created"].endswith("+00:00")


def test_gpt_export_matches_model_at_two_batch_sizes(nano_gpt_run, tmp_path):
    run_dir = nano_gpt_run.out  # 40 nano-GPT steps with 64-byte windows, trained once for the suite
    path = export_recipe("gpt", run_dir, str(tmp_path / "gpt_model"))
    model = load(path)
    assert model.signature["inputs"] == [{"name": "tokens", "dtype": "int32", "shape": ["b", 64]}]
    assert model.signature["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["b", 64, 256]}]

    with checkpoint.CheckpointManager(os.path.join(run_dir, "checkpoints"), async_save=False) as manager:
        run_config = manager.extra()["config"]
    _, reference, _ = gpt.build(gpt.RunConfig(**run_config))
    params = checkpoint.restore(run_dir, params_only=True)
    apply = jax.jit(reference.apply)
    rng = np.random.default_rng(0)
    for batch in (2, 5):
        tokens = rng.integers(0, 256, (batch, 64), dtype=np.int32)
        expected = np.asarray(apply({"params": params}, tokens))
        np.testing.assert_allclose(model(tokens), expected, rtol=1e-5, atol=1e-5)
    # The export carries a KV-cache decode step: greedy generation matches the framework's.
    prompt = [100, 101, 102]
    got = list(model.generator.stream(prompt, 8, temperature=0.0))
    want = models.generate(reference, params, np.array([prompt], np.int32), 8, temperature=0.0)
    assert got == np.asarray(want[0, 3:]).tolist()
    # Sampling too: one sampler, so the same seed gives the same tokens here and in the recipe.
    options = dict(temperature=1.0, top_k=20, top_p=0.9, seed=3)
    got = list(model.generator.stream(prompt, 8, **options))
    want = models.generate(reference, params, np.array([prompt], np.int32), 8, **options)
    assert got == np.asarray(want[0, 3:]).tolist()


def test_loader_runs_without_flax(digits_export, images, tmp_path):
    # A server loading a model needs none of the training stack: the export
    # package loads its names lazily, and the loader imports only jax and numpy.
    script = f"""
import json, sys
import numpy as np
from lepton_jax.export import load
model = load({digits_export!r})
np.save({str(tmp_path / "logits.npy")!r}, np.asarray(model(np.load({str(tmp_path / "images.npy")!r}))))
print(json.dumps({{m: m in sys.modules for m in ("flax", "optax", "orbax", "lepton_jax.train")}}))
"""
    np.save(tmp_path / "images.npy", images[:6])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert imported == {"flax": False, "optax": False, "orbax": False, "lepton_jax.train": False}
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), load(digits_export)(images[:6]), rtol=1e-6)


def test_signature_mismatch_raises_naming_the_input(digits_export, images):
    model = load(digits_export)
    expected = r"input 'images' expected rank 4 float32\[b, 8, 8, 1\], got float32\[2, 8, 8\]"
    with pytest.raises(ValueError, match=expected):
        model(images[:2, :, :, 0])
    with pytest.raises(ValueError, match=r"input 'images' expected shape .*got float32\[2, 7, 8, 1\] \(axis 1\)"):
        model(images[:2, :7])
    with pytest.raises(ValueError, match=r"input 'images' expected dtype float32.*got complex64"):
        model(images[:2].astype(np.complex64))
    with pytest.raises(ValueError, match=r"expected 1 inputs \['images'\], got 2"):
        model(images[:2], images[:2])
    assert model(images=images[:2]).shape == (2, 10)  # by name
    with pytest.raises(ValueError, match=r"platform='tpu' has no devices here"):
        load(digits_export, platform="tpu")
    assert model(images[:2].astype(np.float64)).dtype == np.float32  # same-kind casts are fine


def two_input_fn(params, x_BxF, ids_B):
    return {"scores": x_BxF @ params["w"] + params["b"][ids_B][:, None], "ids": ids_B * 2}


def test_multiple_inputs_and_outputs_share_the_batch(tmp_path):
    params = {"w": np.arange(6, dtype=np.float32).reshape(3, 2), "b": np.array([0.5, -1.0], np.float32)}
    x, ids = np.ones((4, 3), np.float32), np.array([0, 1, 1, 0], np.int32)
    path = export_model(tmp_path, two_input_fn, params, (x, ids), input_names=("x", "ids"),
                        output_names=("ids", "scores"), platforms=("cpu",))
    model = load(path)
    assert [s["shape"] for s in model.signature["inputs"]] == [["b", 3], ["b"]]
    out = model(x, ids)
    np.testing.assert_allclose(out["scores"], two_input_fn(params, x, ids)["scores"])
    np.testing.assert_array_equal(model(x[:1], ids[:1])["ids"], [0])
    with pytest.raises(ValueError, match=r"share the batch dimension 'b', but 'x' has 4 rows and 'ids' has 2"):
        model(x, ids[:2])
    with pytest.raises(ValueError, match=r"input 'ids' expected dtype int32\[b\], got float32\[4\]"):
        model(x, ids.astype(np.float32))
    with pytest.raises(ValueError, match="output_names has 1 names"):
        export_model(tmp_path, two_input_fn, params, (x, ids), input_names=("x", "ids"), platforms=("cpu",))
    with pytest.raises(ValueError, match=r"platform='tpu' but .* was exported for \('cpu',\)"):
        load(path, platform="tpu")


def test_versions_and_unusual_params_round_trip(tmp_path):
    import jax.numpy as jnp

    def affine(params, x_BxF):
        return x_BxF * params["file"].astype(jnp.float32) + params["nested"][0]["bias"]

    x = np.ones((2, 3), np.float32)
    first = {"file": jnp.full((3,), 2.0, jnp.bfloat16), "nested": [{"bias": np.zeros(3, np.float32)}]}
    second = {"file": jnp.full((3,), 3.0, jnp.bfloat16), "nested": [{"bias": np.ones(3, np.float32)}]}
    assert export_model(tmp_path, affine, first, x, platforms=("cpu",), metadata={"note": "a"}).endswith("/1")
    assert export_model(tmp_path, affine, second, x, platforms=("cpu",)).endswith("/2")
    assert list_versions(tmp_path) == [1, 2]
    latest, v1 = load(tmp_path), load(tmp_path, version=1)
    assert (latest.version, v1.version, v1.metadata["note"]) == (2, 1, "a")
    np.testing.assert_allclose(v1(x), 2 * x)
    np.testing.assert_allclose(latest(x), 3 * x + 1)
    assert v1.params["file"].dtype == jnp.bfloat16 and v1.signature["params"][0]["path"] == "file"
    assert load(os.path.join(tmp_path, "1")).version == 1  # a version folder loads directly
    with pytest.raises(FileExistsError, match="version 2 already exists"):
        export_model(tmp_path, affine, first, x, platforms=("cpu",), version=2)
    with pytest.raises(FileNotFoundError, match=r"no version 7; versions are \[1, 2\]"):
        load(tmp_path, version=7)
    with pytest.raises(ValueError, match="preprocessing op 'resize'"):
        export_model(tmp_path, affine, first, x, platforms=("cpu",), preprocessing={"resize": {}})
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp")]


def test_cli_export(digits_run, tmp_path, capsys):
    out = str(tmp_path / "models")
    assert cli.main(["export", "--recipe", "digits", "--ckpt", digits_run, "--out", out]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(out, "1")
    step = load(out).metadata["source"]["step"]
    assert cli.main(["export", "--recipe=digits", f"--ckpt={digits_run}", f"--out={out}", f"--step={step}"]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(out, "2")
    assert cli.main(["export", "--recipe=digits", f"--ckpt={digits_run}", f"--out={out}", "--step=999"]) == 1
    assert "no step 999" in capsys.readouterr().err
