import pathlib
import re

from lepton_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_info_prints_versions_and_devices(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^jax\s+\d", out, re.M) and "device" in out


def test_train_lists_recipes(capsys):
    assert cli.main(["train", "--list"]) == 0
    assert "digits" in capsys.readouterr().out
    assert cli.main(["train", "nope"]) == 2


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci and ci in (ROOT / "README.md").read_text()
