"""`emformer demo [--out demo/] [--quick]`: the README's first command (`make demo`).

Runs configs/sweeps/demo.yaml (the sample-complexity check of DESIGN §3 with N = 512..8192 plus fresh
episodes, and a depth trend L = 1, 2, 4; 16 CPU runs, 2 at a time, about 10 minutes on 2 cores) through the
local sweep backend, then `emformer report` on it, and prints where report.md is and its summary table.
Re-running it skips finished runs and resumes unfinished ones (the sweep's own behaviour), so an interrupted
demo continues where it stopped. `--quick` runs configs/sweeps/demo_quick.yaml instead: tiny runs that
check the whole path in well under a minute (what the tests use); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from emformer.errors import ConfigError

SPECS = {False: "demo.yaml", True: "demo_quick.yaml"}


def spec_path(quick: bool) -> Path:
    """The demo's sweep spec: configs/sweeps/ of the repository (editable install) or of the working dir."""
    name = SPECS[quick]
    for root in (Path(__file__).resolve().parents[1] / "configs", Path.cwd() / "configs"):
        if (root / "sweeps" / name).is_file():
            return root / "sweeps" / name
    raise ConfigError(f"configs/sweeps/{name} not found (run the demo from the repository root)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="demo directory: sweep/ (the runs) and report/ go there (default demo/, or "
                             "demo-quick/ with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny runs that check the path end to end (seconds)")
    parser.add_argument("--parallel", type=int, default=None, help="runs at once (default: the spec's, 2)")


def run(args: argparse.Namespace) -> int:
    from emformer.train import report
    from emformer.train.sweep import LocalOptions, load_spec, prepare_sweep
    from emformer.train.sweep_local import run_local

    out = args.out if args.out is not None else Path("demo-quick" if args.quick else "demo")
    spec = load_spec(spec_path(args.quick))
    parallel = args.parallel if args.parallel is not None else spec.local.parallel
    LocalOptions.from_dict({"parallel": parallel, "threads_per_run": spec.local.threads_per_run}, "--parallel")
    sweep = prepare_sweep(spec, out / "sweep")
    print(f"emformer demo: {len(sweep.points)} training runs ({spec.name}, {parallel} at a time) in {sweep.dir}")
    started = time.monotonic()
    failed = run_local(sweep, sweep.points, parallel=parallel, threads=spec.local.threads_per_run)
    print(f"emformer demo: training took {time.monotonic() - started:.0f} s; building the report")
    result = report.build_report(sweep.dir, out / "report")
    print()
    report.print_summary(result)
    print(f"\nOpen {result.report_path} for the figures and the rules behind each verdict.")
    if failed:
        print(f"emformer demo: {len(failed)} run(s) failed ({failed}); see their console.log, "
              f"`emformer status {sweep.dir}`, and re-run the demo to resume them")
        return 1
    return result.exit_code
