"""The container image, without a container engine (none runs on our
machines): the Dockerfile's install and entrypoint commands run in a fresh
virtual environment, and its health check, and every probe path of the
deploy/ manifests, answer from the server it starts."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
import venv

import httpx
import pytest
import yaml

from test_server import _export_models, _free_port  # noqa: E402 (helpers of the KServe v1 tests)

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
pytestmark = pytest.mark.slow  # a package install and a server process


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (instruction, arguments), continuation lines joined."""
    with open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8") as file:
        text = file.read().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_dockerfile_is_slim_non_root_and_healthchecked():
    steps = _instructions()
    kinds = [kind for kind, _ in steps]
    values = dict(steps)
    assert values["FROM"].startswith("python:") and values["FROM"].endswith("-slim")
    assert kinds.index("USER") > kinds.index("RUN") and values["USER"] not in ("root", "0")
    assert values["EXPOSE"] == "8000" and "/healthz" in values["HEALTHCHECK"]
    assert json.loads(values["ENTRYPOINT"])[:2] == ["lepton-jax", "serve"]


def test_install_and_entrypoint_serve_in_a_fresh_environment(tmp_path):
    steps = _instructions()
    # The build context, as the COPY lines place it.
    context = tmp_path / "image"
    context.mkdir()
    for kind, args in steps:
        if kind == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                src = os.path.join(ROOT, source)
                (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, context / source)
    # A fresh environment. Its dependencies come from this one's site-packages
    # (a .pth line), so `pip install .` builds and installs the package only:
    # the registry is not asked for jax and the rest again. The environment
    # gets no pip of its own (ensurepip takes 5 s): the image's `pip ...`
    # lines run this environment's pip with `--python` pointing into it.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    site = next((env_dir / "lib").glob("python*/site-packages"))
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    bin_dir = env_dir / "bin"
    environment = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(env_dir),
                   "PIP_NO_CACHE_DIR": "1", "PYTHONPATH": ""}
    pip_lines = [args for kind, args in steps if kind == "RUN" and args.startswith("pip ")]
    assert pip_lines, "the Dockerfile installs nothing with pip"
    for args in pip_lines:
        command = [sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), *shlex.split(args)[1:]]
        subprocess.run(command, cwd=context, env=environment, check=True, capture_output=True, timeout=600)
    installed = subprocess.run([str(bin_dir / "python"), "-c", "import lepton_jax; print(lepton_jax.__file__)"],
                               cwd=tmp_path, env=environment, capture_output=True, text=True, check=True)
    assert installed.stdout.startswith(str(site))  # the package is the installed copy, not the checkout

    model_dir, _, _, _ = _export_models(tmp_path / "models")
    values = dict(steps)
    port = _free_port()
    command = json.loads(values["ENTRYPOINT"]) + [model_dir, "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        health = values["HEALTHCHECK"].split("CMD", 1)[1].strip().replace("8000", str(port))
        while subprocess.run(health, shell=True, env=environment, capture_output=True).returncode != 0:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "the health check never passed"
            time.sleep(0.5)
        # Every probe the manifests declare answers on the port the image exposes.
        for name in ("kubernetes.yaml", "kserve.yaml"):
            with open(os.path.join(ROOT, "deploy", name), encoding="utf-8") as file:
                documents = [d for d in yaml.safe_load_all(file) if d]
            containers = [c for d in documents for c in _containers(d)]
            assert containers, name
            for container in containers:
                ports = [p["containerPort"] for p in container["ports"]]
                assert ports == [int(values["EXPOSE"])], (name, ports)
                for probe in ("readinessProbe", "livenessProbe"):
                    if probe in container:
                        path = container[probe]["httpGet"]["path"]
                        assert httpx.get(f"http://127.0.0.1:{port}{path}").status_code == 200, (name, path)
        predicted = httpx.post(f"http://127.0.0.1:{port}/v1/models/digits:predict",
                               json={"instances": [[[[0.0]] * 8] * 8]})
        assert predicted.status_code == 200 and len(predicted.json()["predictions"][0]) == 10
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert server.returncode == 0  # a drained, orderly shutdown


def _containers(document: dict) -> list[dict]:
    spec = document.get("spec", {})
    if document.get("kind") == "Deployment":
        return spec["template"]["spec"]["containers"]
    if document.get("kind") == "InferenceService":
        return spec["predictor"]["containers"]
    return []
