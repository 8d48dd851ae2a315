"""`emformer report SWEEP_DIR [SWEEP_DIR ...] [--out DIR] [--test-shift ...] [--wandb [MODE]]`: check a sweep
against the theory (DESIGN §3); the arguments and the exit status (the work is build.py's).

Reads every run's config and metrics log through train/rundir.py and writes `report.md` with PNG figures:
training curves, the sample-complexity check (excess test loss and train/test gap against N, slope with a
bootstrap interval over seeds, against b ≤ −1/2), err against depth and heads at the largest N, err against
the separation Δ (slope of log err against Δ², theory −1/8), and model-vs-EM per setting outside the theory.
With `--test-shift task.n=128` (repeatable) it also evaluates every run's checkpoint on its task with other
values at test time (k, n, Δ, weights, noise) against EM on the same episodes. Sections the sweep cannot
support say "not in this sweep". Runs that are missing, unfinished or have corrupt metrics lines are listed
in the report (with file and line), never dropped silently. wandb is written to only with `--wandb`.

Exit status: 0 when the report is written and every metrics line was read; 1 when it is written but some
metrics line or config was corrupt (each is printed to stderr as FILE:LINE: what is wrong, and listed in the
report); 2 for a user error (no such sweep directory, no runs in it, a single run's directory).
"""
from __future__ import annotations

import argparse

from emformer.train.report.build import build_report
from emformer.train.report.summary import print_summary
from emformer.train.report.wandb_log import MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR",
                        help="sweep directory (from `emformer sweep --out`); several are combined into one report")
    parser.add_argument("--out", default=None, help="where report.md and the PNGs go (default: SWEEP_DIR/report)")
    parser.add_argument("--test-shift", action="append", default=[], metavar="task.KEY=VALUE[,...]",
                        help="also evaluate every run's checkpoint with these task values at test time (k, n, "
                             "separation, weights, noise ...) against EM; repeat for several settings")
    parser.add_argument("--wandb", nargs="?", const="auto", default="disabled", choices=MODES, metavar="MODE",
                        help="also log the figures to the sweep's wandb group; MODE one of "
                             f"{', '.join(MODES)} (bare --wandb: auto, the mode in the runs' configs); "
                             "default: nothing is written for wandb")


def run(args: argparse.Namespace) -> int:
    result = build_report(args.sweep_dirs, args.out, wandb_mode=args.wandb, test_shifts=args.test_shift)
    print_summary(result)
    if result.wandb:
        print(f"wandb: {result.wandb}")
    return result.exit_code
