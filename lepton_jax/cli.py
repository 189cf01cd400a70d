"""The ``lepton-jax`` command line.

    lepton-jax info                       # versions and devices
    lepton-jax train digits --model cnn   # run a recipe with config overrides
    lepton-jax train --list               # the recipes installed
    lepton-jax train digits --config runs/tune/digits/best.json  # a config file (e.g. tune's best)
    lepton-jax data pack --corpus "texts/*.txt" --seq-len 1024 --out packed  # tokenize and pack a corpus
    lepton-jax convert --from-hf hf/llama --out ckpt/llama  # Hugging Face checkpoints in (and --to-hf out)
    lepton-jax tune digits --model=mlp --space "learning_rate=loguniform(1e-4,1e-1)" --metric accuracy
    lepton-jax ckpt ls runs/x/checkpoints # list, inspect, diff, convert, verify checkpoints
    lepton-jax export --recipe digits --ckpt runs/digits --out models/digits  # a versioned model directory
    lepton-jax serve models/digits --port 8000 # HTTP predictions with dynamic batching
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence


def _info() -> int:
    import jax

    import lepton_jax

    versions = {"lepton_jax": lepton_jax.__version__, "jax": jax.__version__}
    for name in ("jaxlib", "flax", "optax", "orbax.checkpoint", "chex"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except (ImportError, AttributeError):
            versions[name] = "not installed"
    for name, version in versions.items():
        print(f"{name:18s} {version}")
    print(f"{'backend':18s} {jax.default_backend()}")
    for device in jax.devices():
        print(f"{'device':18s} {device}")
    return 0


def _train(recipe: str | None, overrides: list[str], list_only: bool) -> int:
    from lepton_jax import registry

    # Recipes register themselves (the lepton_jax.recipes entry points): the
    # library knows none by name, and a user's package can add its own.
    available = registry.names()
    if list_only or recipe is None:
        print("recipes:", ", ".join(available) or "(none installed)")
        return 0 if list_only else 2
    if recipe not in available:
        print(f"lepton-jax train: unknown recipe {recipe!r}; available: {available}", file=sys.stderr)
        return 2
    overrides = _config_file_overrides(recipe, overrides)
    result = registry.get(recipe).main(overrides)
    # A recipe whose main returns an exit status (e.g. 2 for a bad argument) passes it on.
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _config_file_overrides(recipe: str, overrides: list[str]) -> list[str]:
    """``--config FILE.json`` (e.g. ``lepton-jax tune``'s best.json, or a
    results.json) replaced by its config's ``--field=value`` overrides; the
    other overrides, given after it, win. ``--config`` of a recipe whose config
    has a field of that name (``gpt --config tiny``) is left alone."""
    import json
    import os

    from lepton_jax import config as config_lib

    out, i = [], 0
    while i < len(overrides):
        arg = overrides[i]
        path = None
        if arg.startswith("--config="):
            path = arg.partition("=")[2]
        elif arg == "--config" and i + 1 < len(overrides):
            path = overrides[i + 1]
        if path is not None and path.endswith(".json"):
            if not os.path.isfile(path):
                raise CommandError(f"lepton-jax train {recipe}: --config {path}: no such file")
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            values = data.get("config") if isinstance(data, dict) and isinstance(data.get("config"), dict) else data
            if not isinstance(values, dict):
                raise CommandError(f"lepton-jax train {recipe}: --config {path}: expected a JSON object "
                                   f"(or one with a \"config\" object), got {type(values).__name__}")
            out = [*config_lib.to_overrides(values), *out]
            i += 1 if "=" in arg else 2
            continue
        out.append(arg)
        i += 1
    return out


class CommandError(Exception):
    """A usage error of the command line, printed as one line."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lepton-jax", description="lepton_jax command line")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print versions and devices")
    train = commands.add_parser("train", help="run a training recipe; extra --name=value args override its config")
    train.add_argument("recipe", nargs="?", help="recipe name, e.g. digits")
    train.add_argument("--list", action="store_true", help="list the installed recipes")
    ckpt = commands.add_parser("ckpt", add_help=False, help="list, inspect, diff, convert and verify checkpoints "
                               "(lepton-jax ckpt -h for more)")
    ckpt.add_argument("args", nargs=argparse.REMAINDER)
    data = commands.add_parser("data", add_help=False, help="train tokenizers, pack corpora into ArrayRecord shards "
                               "(lepton-jax data -h for more)")
    data.add_argument("args", nargs=argparse.REMAINDER)
    convert = commands.add_parser("convert", add_help=False, help="Hugging Face model directories to checkpoints and "
                                  "back (lepton-jax convert -h for more)")
    convert.add_argument("args", nargs=argparse.REMAINDER)
    tune = commands.add_parser("tune", add_help=False, help="hyper-parameter search over a recipe's config on Optuna "
                               "(lepton-jax tune -h for more)")
    tune.add_argument("args", nargs=argparse.REMAINDER)
    export = commands.add_parser("export", help="export a recipe's checkpoint to a versioned model directory")
    export.add_argument("--recipe", required=True, help="the registered recipe that trained it (lepton-jax train --list)")
    export.add_argument("--ckpt", required=True, help="checkpoint directory (or the run's output directory)")
    export.add_argument("--out", required=True, help="model directory; a new version folder is added")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    export.add_argument("--quantize", choices=("int8", "int8_weight"), default=None,
                        help="post-training int8 quantization (weights and activations, or weights only; with "
                             "--format onnx, int8 is ONNX Runtime's dynamic quantization)")
    export.add_argument("--format", choices=("jax", "onnx"), default="jax",
                        help="jax: a versioned jax.export model directory; onnx: an .onnx file for edge runtimes")
    serve = commands.add_parser("serve", help="serve exported model directories over HTTP (KServe v1 REST)")
    serve.add_argument("model_dirs", nargs="+", help="model directories written by lepton-jax export")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=64, help="most rows per model call")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    serve.add_argument("--slots", type=int, default=8, help="generation requests decoded at once (KV-cache rows)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        if rest:
            parser.error(f"serve: unrecognized arguments {rest}")
        from lepton_jax.serve import serve as run_server

        try:
            run_server(args.model_dirs, host=args.host, port=args.port, max_batch=args.max_batch,
                       max_wait_ms=args.max_wait_ms, slots=args.slots)
        except (FileNotFoundError, ValueError) as error:
            print(f"lepton-jax serve: {error}", file=sys.stderr)
            return 1
        return 0
    if args.command == "ckpt":
        from lepton_jax.checkpoint.cli import run_ckpt

        # Options before the verb (e.g. -h) land in rest; the verb and all after it in args.args.
        return run_ckpt([*rest, *args.args])
    if args.command == "data":
        from lepton_jax.data.cli import run_data

        return run_data([*rest, *args.args])
    if args.command == "convert":
        from lepton_jax.convert.cli import run_convert

        return run_convert([*rest, *args.args])
    if args.command == "tune":
        from lepton_jax.tune.cli import TuneError, tune as run_tune

        try:
            return run_tune([*rest, *args.args])
        except (TuneError, ValueError, KeyError, TypeError) as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            print(f"lepton-jax tune: {message}", file=sys.stderr)
            return 2
    if args.command == "export":
        if rest:
            parser.error(f"export: unrecognized arguments {rest}")
        from lepton_jax.export import export_recipe, export_recipe_onnx

        try:
            if args.format == "onnx":
                print(export_recipe_onnx(args.recipe, args.ckpt, args.out, step=args.step, quantize=args.quantize))
            else:
                print(export_recipe(args.recipe, args.ckpt, args.out, step=args.step, quantize=args.quantize))
        except (FileNotFoundError, ValueError) as error:
            print(f"lepton-jax export: {error}", file=sys.stderr)
            return 1
        return 0
    if args.command == "info":
        if rest:
            parser.error(f"info takes no arguments, got {rest}")
        return _info()
    try:
        return _train(args.recipe, rest, args.list)
    except CommandError as error:
        print(error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
