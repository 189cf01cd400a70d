"""Recipes register through the lepton_jax.recipes entry points: a user's own
package adds one that `lepton-jax train` and `lepton-jax export` then know."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from lepton_jax import cli, registry
from lepton_jax.export import export_recipe, load

USER_RECIPE = '''
import dataclasses, sys
import numpy as np, optax
from lepton_jax import checkpoint, config as config_lib, data, models, registry, train


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int = 4
    hidden: int = 8
    out: str = "runs/mine"


def build(config):
    return models.MLPClassifier(num_classes=3, hidden=(config["hidden"],), dropout_rate=0.0)


def main(argv=None):
    config = config_lib.override(Config(), list(sys.argv[1:] if argv is None else argv))
    rng = np.random.default_rng(0)
    split = {"image": rng.normal(size=(32, 2, 2, 1)).astype(np.float32),
             "label": rng.integers(0, 3, 32).astype(np.int32)}
    model, tx = build(config_lib.to_dict(config)), optax.sgd(0.1)
    state = train.create_train_state(model, tx, split["image"][:1])
    hooks = train.default_hooks(config.out, progress=False, tensorboard=False, plot=False,
                                extra={"config": config_lib.to_dict(config)})
    train.fit(state, train.make_train_step(model, tx, train.classification_loss(), input_key="image"), data.BatchIterator(split, 8),
              num_steps=config.steps, hooks=hooks)


def export(manager, step, config):
    model = build(config)
    params = manager.restore(step, params_only=True)
    return registry.ExportParts(apply_fn=lambda v, x: model.apply(v, x), variables={"params": params},
                                example_inputs=np.zeros((1, 2, 2, 1), np.float32), input_names=("x",),
                                output_names=("logits",), model=model, config=config)


RECIPE = registry.Recipe(name="mine", main=main, export=export, description="a user's recipe")
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """An installed package (a dist-info with an entry point) holding a recipe."""
    (tmp_path / "my_recipe_pkg.py").write_text(USER_RECIPE)
    info = tmp_path / "my_recipe_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-recipe-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [lepton_jax.recipes]
        mine = my_recipe_pkg:RECIPE
        broken = my_recipe_pkg:Config
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_users_recipe_trains_and_exports_through_the_cli(user_package, tmp_path, capsys):
    assert {"digits", "gpt", "mine"} <= set(registry.names())
    assert cli.main(["train", "--list"]) == 0 and "mine" in capsys.readouterr().out
    run = str(tmp_path / "run")
    assert cli.main(["train", "mine", "--steps=3", f"--out={run}"]) == 0
    assert cli.main(["export", "--recipe", "mine", "--ckpt", run, "--out", str(tmp_path / "model")]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    with open(f"{path}/metadata.json") as f:
        metadata = json.load(f)
    assert metadata["recipe"] == "mine" and metadata["config"]["steps"] == 3 and metadata["source"]["step"] == 3
    # The export computes what the recipe's own model computes from the checkpoint.
    from lepton_jax import checkpoint

    import my_recipe_pkg

    params = checkpoint.restore(run, params_only=True)
    x = np.random.default_rng(1).normal(size=(5, 2, 2, 1)).astype(np.float32)
    want = my_recipe_pkg.build({"hidden": 8}).apply({"params": params}, x)
    np.testing.assert_allclose(load(str(tmp_path / "model"))(x), want, rtol=1e-5, atol=1e-6)


def test_unknown_and_malformed_recipes_get_clear_errors(user_package, tmp_path):
    with pytest.raises(ValueError, match=r"export_recipe: unknown recipe 'nope'; registered recipes .*'digits'"):
        export_recipe("nope", tmp_path, tmp_path / "out")
    with pytest.raises(TypeError, match=r"recipe 'broken' must be a lepton_jax.registry.Recipe, got type"):
        registry.get("broken")
