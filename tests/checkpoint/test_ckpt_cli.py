"""lepton-jax ckpt: every verb's table and JSON against numpy, safetensors round
trips, verify on NaNs and damaged steps, and the errors (exit 2, one line)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from lepton_jax.checkpoint import safetensors_io
from lepton_jax.checkpoint.cli import run_ckpt

BF16 = ml_dtypes.bfloat16
EXTRA = {"config": {"width": 16}, "data": {"epoch": 3}}


def _state(seed: int) -> dict:
    """A small training state; kernel and mu are over Orbax's 1 KiB inline
    limit, so they live in data files that a test can damage."""
    rng = np.random.default_rng(seed)
    return {
        "step": np.asarray(seed, np.int32),
        "params": {
            "dense": {"kernel": rng.standard_normal((32, 16)).astype(np.float32),
                      "bias": rng.standard_normal(16).astype(BF16)},
            "embed": rng.integers(-100, 100, (10, 4)).astype(np.int32),
        },
        "opt_state": {"mu": {"kernel": rng.standard_normal((32, 16)).astype(np.float32)},
                      "count": np.asarray(seed * 10, np.int32)},
    }


def _write(directory, states: dict[int, dict], extra=EXTRA) -> str:
    """Writes with plain Orbax; a ``best_fn`` makes Orbax store the metrics."""
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
    manager = ocp.CheckpointManager(directory, item_names=("state", "extra"), options=options)
    for step, state in states.items():
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)),
                     metrics={"loss": 1.0 / step, "accuracy": 0.25 * step})
    manager.wait_until_finished()
    manager.close()
    return str(directory)


def _flat(tree: dict) -> dict[str, np.ndarray]:
    return {name: np.asarray(x) for name, x in safetensors_io.flatten(tree).items()}


def _run(capsys, *argv) -> tuple[int, str, str]:
    status = run_ckpt([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _run_json(capsys, *argv) -> tuple[int, dict]:
    status, out, _ = _run(capsys, *argv, "--json")
    return status, json.loads(out)


def _read_plain(directory, step: int) -> tuple[dict, dict]:
    """The state and extra of a step, read with plain Orbax as the docs suggest."""
    manager = ocp.CheckpointManager(directory, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                              "extra": ocp.JsonCheckpointHandler()},
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    metadata = manager.item_metadata(step)["state"].tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata,
                            is_leaf=lambda x: hasattr(x, "shape"))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             extra=ocp.args.JsonRestore()))
    manager.close()
    return jax.tree.map(np.asarray, restored["state"]), restored["extra"]


def _assert_bits_equal(x: np.ndarray, y: np.ndarray) -> None:
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return _write(tmp_path_factory.mktemp("ckpt") / "run", {1: _state(1), 2: _state(2)})


# -- ls, inspect ---------------------------------------------------------------


def test_ls_lists_steps_with_size_time_and_metrics(ckpt, capsys):
    status, result = _run_json(capsys, "ls", ckpt)
    assert status == 0 and result["directory"] == ckpt
    assert [s["step"] for s in result["steps"]] == [1, 2]
    for entry in result["steps"]:
        step_dir = os.path.join(ckpt, str(entry["step"]))
        on_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(step_dir) for f in files)
        assert entry["bytes"] == on_disk > 2 * 32 * 16 * 4
        assert entry["metrics"] == pytest.approx({"loss": 1.0 / entry["step"], "accuracy": 0.25 * entry["step"]})
        assert abs(entry["timestamp"] - os.path.getmtime(step_dir)) < 60
    status, out, _ = _run(capsys, "ls", ckpt)
    assert status == 0
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["step", "time"] and lines[3].startswith("2 ") and "loss=0.5" in lines[3]


def test_inspect_reports_every_array_from_metadata(ckpt, capsys):
    for step in (1, 2):
        argv = ["inspect", ckpt] + (["--step", "1"] if step == 1 else [])  # default: the latest
        status, result = _run_json(capsys, *argv)
        expected = _flat(_state(step))
        assert status == 0 and result["step"] == step
        assert {a["path"]: (tuple(a["shape"]), a["dtype"], a["bytes"]) for a in result["arrays"]} == {
            name: (x.shape, x.dtype.name, x.nbytes) for name, x in expected.items()}
        assert result["total_bytes"] == sum(x.nbytes for x in expected.values())
        assert result["total_params"] == 32 * 16 + 16 + 10 * 4
    status, out, _ = _run(capsys, "inspect", ckpt)
    assert status == 0 and "step 2 of" in out
    assert any(line.split() == ["params/dense/bias", "(16,)", "bfloat16", "32"] for line in out.splitlines())
    assert "6 arrays" in out and "568 params" in out


def test_inspect_counts_every_array_without_a_params_subtree(tmp_path, capsys):
    directory = _write(tmp_path / "flat", {3: {"w": np.ones((2, 3), np.float32), "n": np.arange(4)}})
    status, result = _run_json(capsys, "inspect", directory)
    assert status == 0 and result["step"] == 3 and result["total_params"] == 10


def test_inspect_reports_sparsity_per_array(tmp_path, capsys):
    w = np.arange(20, dtype=np.float32).reshape(4, 5)
    w[w % 4 == 0] = 0.0  # 5 of 20 are zero
    directory = _write(tmp_path / "pruned", {1: {"params": {"w": w, "b": np.ones(3, np.float32)}}})
    status, result = _run_json(capsys, "inspect", directory, "--sparsity")
    assert status == 0
    assert {a["path"]: a["sparsity"] for a in result["arrays"]} == {"params/w": 0.25, "params/b": 0.0}
    assert run_ckpt(["inspect", directory, "--sparsity"]) == 0
    assert "25.0%" in capsys.readouterr().out


# -- diff ----------------------------------------------------------------------


def test_diff_reports_paths_shapes_dtypes_and_max_abs_difference(ckpt, tmp_path, capsys):
    status, result = _run_json(capsys, "diff", ckpt, ckpt, "--step-a", "2")
    assert status == 0 and result["identical"]
    assert all(a["max_abs_diff"] == 0.0 for a in result["arrays"]) and len(result["arrays"]) == 6
    assert _run(capsys, "diff", ckpt, ckpt)[1].splitlines()[-1] == "6 common arrays; checkpoints identical"

    a, b = _state(2), _state(2)
    b["params"]["dense"]["kernel"][3, 5] += 0.25
    b["params"]["embed"] = b["params"]["embed"].reshape(4, 10)
    b["opt_state"]["mu"]["kernel"] = a["opt_state"]["mu"]["kernel"].astype(BF16)
    del b["opt_state"]["count"]
    b["params"]["new"] = np.zeros(3, np.float32)
    b["step"] = np.asarray(7, np.int32)
    other = _write(tmp_path / "b", {7: b})
    status, result = _run_json(capsys, "diff", ckpt, other)
    assert status == 1 and not result["identical"] and result["b"]["step"] == 7
    assert result["only_in_a"] == ["opt_state/count"] and result["only_in_b"] == ["params/new"]
    by_path = {c["path"]: c for c in result["arrays"]}
    kernel_a, kernel_b = a["params"]["dense"]["kernel"], b["params"]["dense"]["kernel"]
    assert by_path["params/dense/kernel"]["max_abs_diff"] == np.max(np.abs(kernel_a.astype(np.float64) - kernel_b))
    assert by_path["params/embed"]["max_abs_diff"] is None and by_path["params/embed"]["shape_b"] == [4, 10]
    mu = a["opt_state"]["mu"]["kernel"]
    assert by_path["opt_state/mu/kernel"]["dtype_b"] == "bfloat16"
    assert by_path["opt_state/mu/kernel"]["max_abs_diff"] == np.max(np.abs(mu - mu.astype(BF16).astype(np.float64)))
    assert by_path["params/dense/bias"]["equal"] and by_path["step"]["max_abs_diff"] == 5.0

    status, out, _ = _run(capsys, "diff", ckpt, other)
    assert status == 1
    assert "only in A: opt_state/count" in out and "only in B: params/new" in out
    assert "shape differs: params/embed: (10, 4) vs (4, 10)" in out
    assert "dtype differs: opt_state/mu/kernel: float32 vs bfloat16" in out
    assert "values differ: params/dense/kernel: max |a - b| = 0.25" in out


# -- convert -------------------------------------------------------------------


def test_convert_params_only_to_bfloat16_is_readable_by_plain_orbax(ckpt, tmp_path, capsys):
    dst = tmp_path / "bf16"
    status, result = _run_json(capsys, "convert", ckpt, dst, "--params-only", "--dtype", "bfloat16")
    assert status == 0 and result["step"] == 2 and result["arrays"] == 3
    state, extra = _read_plain(dst, 2)
    params = _state(2)["params"]
    assert extra == EXTRA and set(state) == {"params"}
    _assert_bits_equal(state["params"]["dense"]["kernel"], params["dense"]["kernel"].astype(BF16))
    _assert_bits_equal(state["params"]["dense"]["bias"], params["dense"]["bias"])
    _assert_bits_equal(state["params"]["embed"], params["embed"])  # integers are not cast
    assert result["total_bytes"] == 32 * 16 * 2 + 16 * 2 + 10 * 4 * 4


def test_convert_orbax_to_orbax_keeps_everything(ckpt, tmp_path, capsys):
    dst = tmp_path / "copy"
    status, out, _ = _run(capsys, "convert", ckpt, dst, "--step", "1")
    assert status == 0 and out.startswith(f"wrote {dst} (orbax, step 1, 6 arrays")
    state, extra = _read_plain(dst, 1)
    assert extra == EXTRA
    expected = _flat(_state(1))
    assert _flat(state).keys() == expected.keys()
    for name, x in _flat(state).items():
        _assert_bits_equal(x, expected[name])
    assert _run(capsys, "diff", ckpt, dst, "--step-a", "1")[0] == 0


def test_safetensors_export_and_import_round_trip_exactly(ckpt, tmp_path, capsys):
    params = _flat(_state(2)["params"])
    status, result = _run_json(capsys, "convert", ckpt, tmp_path / "export", "--format", "safetensors")
    file = tmp_path / "export" / "model.safetensors"  # a DST without the suffix is a directory
    assert status == 0 and result["destination"] == str(file) and result["arrays"] == 3
    loaded = load_file(str(file))
    assert loaded.keys() == params.keys()
    for name, x in params.items():
        _assert_bits_equal(loaded[name], x)
    with safe_open(str(file), framework="np") as f:
        assert f.metadata() == {"format": "lepton_jax", "step": "2", "subtree": "params", "dtype": "mixed"}
        assert f.get_tensor("dense/bias").dtype == BF16

    status, result = _run_json(capsys, "convert", file, tmp_path / "imported")
    assert status == 0 and result["step"] == 0
    state, extra = _read_plain(tmp_path / "imported", 0)
    assert extra["safetensors_metadata"]["step"] == "2"
    for name, x in _flat(state["params"]).items():
        _assert_bits_equal(x, params[name])
    assert _run(capsys, "convert", file, tmp_path / "at5", "--step", "5")[0] == 0
    assert _run_json(capsys, "ls", tmp_path / "at5")[1]["steps"][0]["step"] == 5


def test_safetensors_export_casts_and_keeps_a_tree_without_params(tmp_path, capsys):
    tree = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "n": np.arange(3, dtype=np.int32)}
    src = _write(tmp_path / "flat", {4: tree})
    file = tmp_path / "w.safetensors"
    assert _run(capsys, "convert", src, file, "--format", "safetensors", "--dtype", "bfloat16")[0] == 0
    with safe_open(str(file), framework="np") as f:
        assert f.metadata()["subtree"] == "" and f.metadata()["dtype"] == "bfloat16"
        _assert_bits_equal(f.get_tensor("w"), tree["w"].astype(BF16))
        _assert_bits_equal(f.get_tensor("n"), tree["n"])
    assert _run(capsys, "convert", file, tmp_path / "back")[0] == 0
    state, _ = _read_plain(tmp_path / "back", 0)
    assert set(state) == {"w", "n"}  # back at the root, not under params


def test_safetensors_io_round_trips_bfloat16_and_scalars(tmp_path):
    tree = {"a": {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "c": np.asarray(1.5, BF16)},
            "d": np.array([np.inf, -0.0, 3.140625], BF16)}
    safetensors_io.save_safetensors(tree, tmp_path / "t.safetensors", metadata={"step": 3})
    loaded = safetensors_io.load_safetensors(tmp_path / "t.safetensors")
    assert jax.tree.structure(loaded) == jax.tree.structure(tree)
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree)):
        _assert_bits_equal(x, y)
    assert safetensors_io.safetensors_metadata(tmp_path / "t.safetensors") == {"step": "3"}
    assert safetensors_io.unflatten(safetensors_io.flatten(tree)).keys() == tree.keys()
    with pytest.raises(ValueError, match="'a/b' lies under 'a', which is itself an array"):
        safetensors_io.unflatten({"a/b": 1, "a": 2})
    with pytest.raises(ValueError, match="containing '/'"):
        safetensors_io.flatten({"a/b": np.zeros(1)})


# -- verify --------------------------------------------------------------------


def test_verify_passes_and_fails_on_non_finite_values(ckpt, tmp_path, capsys):
    status, out, _ = _run(capsys, "verify", ckpt)
    assert status == 0 and out.splitlines() == ["step 1: OK (6 arrays)", "step 2: OK (6 arrays)"]
    bad = _state(2)
    bad["params"]["dense"]["bias"][[2, 7]] = np.nan
    directory = _write(tmp_path / "nan", {1: _state(1), 2: bad})
    status, result = _run_json(capsys, "verify", directory)
    assert status == 1 and not result["ok"]
    assert [(s["step"], s["ok"]) for s in result["steps"]] == [(1, True), (2, False)]
    assert result["steps"][1]["reasons"] == ["params/dense/bias has 2 non-finite value(s)"]
    assert _run(capsys, "verify", directory, "--step", "1")[0] == 0
    status, out, _ = _run(capsys, "verify", directory, "--step", "2")
    assert status == 1 and out.splitlines() == ["step 2: FAIL (6 arrays)", "  params/dense/bias has 2 non-finite value(s)"]


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_verify_fails_on_a_damaged_data_file(ckpt, tmp_path, capsys, damage):
    directory = str(tmp_path / "damaged")
    shutil.copytree(ckpt, directory)
    state_dir = os.path.join(directory, "2", "state")
    data = [os.path.join(r, f) for r, _, files in os.walk(state_dir) if os.path.basename(r) == "d" for f in files]
    biggest = max(data, key=os.path.getsize)  # OCDBT data file holding the large arrays
    if damage == "delete":
        os.remove(biggest)
    else:
        os.truncate(biggest, os.path.getsize(biggest) // 2)
    status, result = _run_json(capsys, "verify", directory)
    assert status == 1
    assert result["steps"][0]["ok"] and not result["steps"][1]["ok"]
    (reason,) = result["steps"][1]["reasons"]
    assert reason.startswith(f"cannot read step 2 in {directory}: ") and "unreadable array(s)" in reason
    assert "kernel" in reason
    assert _run(capsys, "inspect", directory)[0] == 0  # metadata only: inspect still works
    status, _, err = _run(capsys, "diff", directory, ckpt)
    assert status == 2 and err.startswith("lepton-jax ckpt: cannot read step 2") and "Traceback" not in err


def test_verify_fails_on_missing_metadata(ckpt, tmp_path, capsys):
    directory = str(tmp_path / "nometa")
    shutil.copytree(ckpt, directory)
    os.remove(os.path.join(directory, "1", "state", "_METADATA"))
    status, out, _ = _run(capsys, "verify", directory)
    assert status == 1
    assert out.splitlines()[:2] == ["step 1: FAIL (0 arrays)",
                                    f"  step 1 in {directory} has no array metadata (state/_METADATA missing or empty)"]
    assert out.splitlines()[2] == "step 2: OK (6 arrays)"


# -- errors and wiring ---------------------------------------------------------


def test_errors_are_one_line_with_exit_status_2(ckpt, tmp_path, capsys):
    missing, empty, afile = tmp_path / "missing", tmp_path / "empty", tmp_path / "notes.txt"
    empty.mkdir()
    afile.write_text("not a checkpoint")
    flat = _write(tmp_path / "flat", {1: {"w": np.zeros(2, np.float32)}})
    cases = [
        (["ls", missing], f"no such directory {missing}"),
        (["inspect", ckpt, "--step", "7"], f"no step 7 in {ckpt}; steps are [1, 2]"),
        (["verify", ckpt, "--step", "0"], f"no step 0 in {ckpt}; steps are [1, 2]"),
        (["diff", ckpt, ckpt, "--step-b", "9"], f"no step 9 in {ckpt}; steps are [1, 2]"),
        (["verify", empty], f"{empty} is not a checkpoint directory (it has no step directories)"),
        (["ls", afile], f"{afile} is not a directory"),
        (["diff", ckpt, missing], f"no such directory {missing}"),
        (["convert", ckpt, empty.parent], f"{empty.parent} already exists; convert writes a new checkpoint directory"),
        (["convert", ckpt, tmp_path / "x", "--dtype", "int8"], "--dtype must be a floating dtype"),
        (["convert", flat, tmp_path / "x", "--params-only"], f"--params-only: step 1 in {flat} has no 'params'"),
        (["convert", afile, tmp_path / "x"], f"{afile} is not a readable safetensors file"),
    ]
    for argv, message in cases:
        status, out, err = _run(capsys, *argv)
        assert status == 2, argv
        assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert err.startswith(f"lepton-jax ckpt: {message}"), (argv, err)
    assert not (tmp_path / "x").exists()
    assert _run(capsys, "nope")[0] == 2  # argparse: unknown verb


def test_console_script_runs_ckpt(ckpt):
    command = [sys.executable, "-m", "lepton_jax.cli", "ckpt", "ls", ckpt, "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [s["step"] for s in json.loads(done.stdout)["steps"]] == [1, 2]
    done = subprocess.run(command[:4] + ["inspect", ckpt, "--step", "7"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"lepton-jax ckpt: no step 7 in {ckpt}; steps are [1, 2]"
