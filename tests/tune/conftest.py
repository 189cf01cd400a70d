"""A throwaway PostgreSQL server on 127.0.0.1 for the tests (the Debian
``postgresql`` package, which ``.ci/run`` installs)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from typing import Iterator

import pytest


def _binaries() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(initdb)
    raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server(directory: str) -> Iterator[str]:
    """Starts a server with its data in ``directory``; yields its SQLAlchemy URL, stops it after."""
    bindir = _binaries()
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: the package's postgres user runs it
        user = pwd.getpwnam("postgres")
        os.chown(directory, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = os.path.join(directory, "data")
    port = _free_port()

    def run(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{os.path.basename(args[0])} failed ({done.returncode}): {done.stderr.strip()}")
    run(os.path.join(bindir, "initdb"), "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off"
    run(os.path.join(bindir, "pg_ctl"), "-D", data, "-o", options, "-l", os.path.join(directory, "log"), "-w", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(os.path.join(bindir, "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """The URL of a fresh PostgreSQL server, stopped and deleted after the test."""
    # Not under pytest's tmp_path: its folders are private to root, and the server runs as postgres.
    directory = tempfile.mkdtemp(prefix="lepton-pg-")
    os.chmod(directory, 0o755)
    try:
        with postgres_server(directory) as url:
            yield url
    finally:
        shutil.rmtree(directory, ignore_errors=True)
