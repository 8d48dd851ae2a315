"""The `emformer` console script: one subcommand per module, imported only when it runs.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`. Importing lazily keeps light
commands (`generate`, `cluster`, `status`) free of lightning's slow import.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from emformer.errors import EmformerError
from emformer.version import __version__

COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("emformer.train.generate", "write episodes to webdataset shards with a manifest"),
    "baselines": ("emformer.train.baselines_table", "error of EM, Lloyd and the oracle on a task"),
    "train": ("emformer.train.fit", "pre-train a transformer on clustering episodes"),
    "sweep": ("emformer.train.sweep.command", "run a grid of training runs locally or on SLURM"),
    "status": ("emformer.train.sweep.status", "show the state of every point of a sweep"),
    "report": ("emformer.train.report.command", "check a sweep against the theory: report.md and plots"),
    "export": ("emformer.train.export.command", "export a trained checkpoint to safetensors (+ ONNX)"),
    "cluster": ("emformer.train.cluster", "label a CSV or .npy file with an exported model"),
    "demo": ("emformer.train.demo", "the README's demo: a small CPU sweep that ends in a report"),
    "study": ("emformer.train.study", "the CPU study of the theory (≥ 5 seeds, four checks): runs + report"),
    "replication": ("emformer.train.report.replication", "two replications of a study, verdict by verdict"),
}


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """The shared `CONFIG key=value ...` positional arguments."""
    parser.add_argument("config", nargs=None if required else "?", help="YAML config file (configs/...)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.depth=4 task.k=3, "
                        "or group=name to pick configs/<group>/<name>.yaml")


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: emformer COMMAND [ARGS...]\n\ncommands:\n{rows}\n\n`emformer COMMAND --help` for each."


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"emformer {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"emformer: unknown command '{command}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"emformer {command}", description=help_)
    module.add_arguments(parser)
    # intermixed: `key=val` overrides may come after options such as --run-dir
    args = parser.parse_intermixed_args(rest)
    try:
        return int(module.run(args) or 0)
    except EmformerError as exc:
        print(f"emformer {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"emformer {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
