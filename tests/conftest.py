"""Test-process setup, done before anything imports jax.

* Every test process sees 8 CPU devices, so SPMD tests can build real meshes;
  unsharded code still runs on device 0.
* XLA's CPU backend compiles with LLVM -O0 instead of its default -O3. On CPU
  compilation is most of the suite's time: about 4700 programs, most of them
  run once or a few times. -O0 roughly halves a program's compile time (a
  digits CNN's train step: 2.1 -> 0.9 CPU-s; a sharded 1-block GPT train step:
  4.0 -> 2.8 CPU-s); the whole run went from 904 to 789-844 CPU-s (user + sys,
  three runs), every test passing at its own tolerance. Both levels compile
  IEEE arithmetic without fast-math; the last bits of a result can differ
  between levels, so a test and the processes it starts compile at one level.
* Tests that run their programs many times (training digits models to an
  accuracy bar, the shared digits CNN run) carry the ``compute_bound`` marker
  and compile at -O2, in the test's process (``optimized_compiles``) and in
  the processes it starts (``subprocess_env``): -O0's code runs up to 5x
  slower (that CNN step: 4 -> 21 ms), which costs those tests more than -O2's
  compile saves (the pruned CNN test: 31 -> 15 CPU-s at -O2). -O2 gives the
  same numbers as XLA's default -O3, bit for bit (a GPT trained five steps).
* XLA's CPU backend emits its fused loops with its classic LLVM emitter
  (``--xla_cpu_use_fusion_emitters=false``) instead of the newer MLIR fusion
  emitters, which set up MLIR contexts and pass pipelines for every fusion of
  every program. Compiling is 25-35% cheaper (100 rounds of new-shape eager
  ops: 14.5 s -> 10 s; a 2-block GPT's train step: 3.5 -> 2.6 CPU-seconds) and the whole
  suite went from 10:38 to 9:20 on 2 cores, every test passing at its own
  tolerance. Five AdamW steps of a GPT and a CNN's gradients come out bitwise
  the same as with the default emitters; a mean reduction can differ in its
  last bit.
* One XLA compilation cache per test run, shared by the xdist workers and the
  processes the tests start (notebook kernels, workers, servers): a recipe
  resumed in a test compiles the same train step again. The cache starts
  empty in a new temporary folder at every run and is removed at the end, so
  nothing carries over between runs.

* Trained reference runs (the digits recipe's CNN, a short nano-GPT run) are
  made once per test run and shared by every test and xdist worker that reads
  them (``digits_cnn_run``, ``nano_gpt_run``); the first worker to ask trains,
  the others wait for it. Tests that change a run work on a copy.

* Python's bytecode caches are written even where the environment says not
  to (``PYTHONDONTWRITEBYTECODE``, set on our machines): every process of the
  run (two workers, notebook kernels, about 40 subprocesses) would otherwise
  compile lepton_jax's sources again on import, and each worker would
  re-rewrite the test modules' asserts (about 0.3 CPU-s per process).

``LEPTON_TEST_XLA_CACHE=0`` turns the cache off; an ``XLA_FLAGS`` that already
names ``--xla_backend_optimization_level`` keeps its own flags (its level for every test,
default emitters).
"""

import contextlib
import fcntl
import gc
import io
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, NamedTuple

import pytest

# Inherited by the xdist workers and every process they start (see above).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

_LEVEL = "--xla_backend_optimization_level"
_COMPILE_FLAGS = f"{_LEVEL}=0 --xla_cpu_use_fusion_emitters=false"
if "LEPTON_TEST_XLA_FLAGS" not in os.environ:
    # The flags for every process of the run, without the device count.
    own = os.environ.get("XLA_FLAGS", "")
    os.environ["LEPTON_TEST_OWN_LEVEL"] = "1" if _LEVEL in own else "0"
    os.environ["LEPTON_TEST_XLA_FLAGS"] = own if _LEVEL in own else f"{own} {_COMPILE_FLAGS}".strip()
    os.environ["XLA_FLAGS"] = f"{os.environ['LEPTON_TEST_XLA_FLAGS']} --xla_force_host_platform_device_count=8"
_OWN_LEVEL = os.environ["LEPTON_TEST_OWN_LEVEL"] == "1"

# The first process (pytest's controller, or the only one) makes the run's
# folder; xdist workers and every subprocess inherit it through the environment.
_RUN_DIR_OWNER = "LEPTON_TEST_RUN_DIR" not in os.environ
if _RUN_DIR_OWNER:
    os.environ["LEPTON_TEST_RUN_DIR"] = tempfile.mkdtemp(prefix="lepton-jax-tests-")
    if os.environ.get("LEPTON_TEST_XLA_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["LEPTON_TEST_RUN_DIR"], "xla-cache")
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


# Tracing allocates millions of short-lived Python objects; at Python's
# default thresholds the collector's young-generation passes took 7% of the
# CPU of a test process (tests/parallel/test_spmd.py, tests/nn,
# tests/ops/test_attention.py and tests/models, one process: 87.9 CPU-s, 82.4
# at these thresholds, 81.8 with the collector off; peak memory the same,
# 1.85 GB). Cycles are still collected, less often.
gc.set_threshold(20_000, 50, 1_000)


def pytest_collection_finish(session):
    # What the imports and the collection made lives for the whole run: keep
    # it out of the garbage collector's full passes (3% of a worker's time).
    gc.collect()
    gc.freeze()


# Tests that read a shared trained run are slow whatever they do themselves:
# the run is trained for the first of them.
_TRAINED_RUNS = {"digits_cnn_run", "nano_gpt_run"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _TRAINED_RUNS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_unconfigure(config):
    if _RUN_DIR_OWNER:
        shutil.rmtree(os.environ["LEPTON_TEST_RUN_DIR"], ignore_errors=True)


@contextlib.contextmanager
def optimized_compiles():
    """Everything this process compiles inside the block is compiled at LLVM
    -O2 (see the module docstring), through the per-compile option overrides
    that ``jax.jit(..., compiler_options=...)`` also uses. The option is part of
    the compilation cache's key, so -O0 and -O2 programs never mix. A no-op
    when the run's ``XLA_FLAGS`` chose their own level."""
    if _OWN_LEVEL:
        yield
        return
    from jax._src import compiler

    original = compiler.get_compile_options

    def at_o2(*args, env_options_overrides=None, **kwargs):
        overrides = {_LEVEL.lstrip("-"): 2, **(env_options_overrides or {})}
        return original(*args, env_options_overrides=overrides, **kwargs)

    compiler.get_compile_options = at_o2
    try:
        yield
    finally:
        compiler.get_compile_options = original


@pytest.fixture(autouse=True)
def _compute_bound_compiles(request):
    if request.node.get_closest_marker("compute_bound") is None:
        yield
    else:
        with optimized_compiles():
            yield


@pytest.fixture
def subprocess_env(request) -> dict[str, str]:
    """The environment for a process a test starts: one CPU device (no
    simulated mesh), the suite's compile flags (-O2 for ``compute_bound``
    tests, as in their own process) and its compilation cache."""
    flags = os.environ["LEPTON_TEST_XLA_FLAGS"]
    if request.node.get_closest_marker("compute_bound") is not None and not _OWN_LEVEL:
        flags = flags.replace(f"{_LEVEL}=0", f"{_LEVEL}=2")
    return {**os.environ, "XLA_FLAGS": flags}


class SharedRun(NamedTuple):
    """A recipe run made once per test run: its output folder, the arguments
    it ran with, what ``main`` returned and what it printed."""

    out: str
    argv: list[str]
    result: dict
    stdout: str

    def copy_to(self, folder: str) -> str:
        """A private copy of the run's folder, for a test that writes to it."""
        shutil.copytree(self.out, folder)
        return str(folder)


def shared_run(name: str, main: Callable[[list[str]], dict], argv: list[str], compute_bound: bool = False) -> SharedRun:
    """``main([*argv, --out=FOLDER])`` once per test run, whichever xdist
    worker asks first; the others wait on a lock and read its outputs. A
    ``compute_bound`` run compiles at -O2 (``optimized_compiles``)."""
    root = os.path.join(os.environ["LEPTON_TEST_RUN_DIR"], "runs")
    os.makedirs(root, exist_ok=True)
    out, done = os.path.join(root, name), os.path.join(root, f"{name}.json")
    with open(os.path.join(root, f"{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(done):
            shutil.rmtree(out, ignore_errors=True)  # a failed attempt's leftovers
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed), \
                    optimized_compiles() if compute_bound else contextlib.nullcontext():
                result = main([*argv, f"--out={out}"])
            with open(done, "w") as f:
                json.dump({"result": result, "stdout": printed.getvalue()}, f)
    with open(done) as f:
        record = json.load(f)
    return SharedRun(out, [*argv, f"--out={out}"], record["result"], record["stdout"])


@pytest.fixture(scope="session")
def digits_cnn_run() -> SharedRun:
    """The digits recipe's CNN with its default settings (30 epochs)."""
    from recipes import digits

    return shared_run("digits_cnn", digits.main, ["--model=cnn", "--progress=false"], compute_bound=True)


# A short GPT run (the nano config: tiny's widths, two blocks): small batches and windows,
# an evaluation every 10 steps.
GPT_SHORT = ["--config=nano", "--batch_size=8", "--seq_len=64", "--max_bytes=300000", "--eval_every=10",
             "--eval_windows=16", "--progress=false"]


@pytest.fixture(scope="session")
def gpt_short_flags() -> list[str]:
    """The GPT recipe's flags for short test runs (``GPT_SHORT``)."""
    return list(GPT_SHORT)


@pytest.fixture(scope="session")
def nano_gpt_run() -> SharedRun:
    """40 steps of the GPT recipe's nano config on 8 simulated devices
    (``GPT_SHORT``; checkpoints at steps 20, 30 and 40)."""
    from recipes import gpt

    return shared_run("nano_gpt", gpt.main, [*GPT_SHORT, "--steps=40"])


# A BERT-style WordPiece vocabulary for the encoder tests (convert, embed).
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BERT_WORDS = ("the a quick brown fox jump over lazy dog cat sat on mat hello world pack my box with five dozen "
              "liquor jug and is it not very good bad day night".split())


@pytest.fixture(scope="session")
def write_bert_tokenizer() -> Callable[[os.PathLike], None]:
    """Writes a BERT-style WordPiece ``tokenizer.json`` (lower-casing, ``[CLS] ... [SEP]``) to a path."""

    def write(path) -> None:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

        vocab = {token: i for i, token in enumerate([*BERT_SPECIALS, *BERT_WORDS, "##s", "##ed", "##ing", "."])}
        tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        tokenizer.decoder = decoders.WordPiece()
        tokenizer.save(str(path))

    return write
