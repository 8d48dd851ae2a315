"""`emformer demo [--out demo/] [--quick]`: the README's first command (`make demo`).

Runs the repository's configs/sweeps/demo.yaml through the local sweep backend: the sample-complexity check
of DESIGN §3 (N = 512..8192 pool episodes plus fresh episodes) and a depth trend (L = 1, 2, 4 at N = ∞), 2 seeds,
18 CPU runs of 1000 steps, 2 at a time with one thread each (README gives the time it took). Then it runs
`emformer report` on the sweep and prints where report.md is and its summary table. The spec is found next to
the installed package (an editable install of a checkout), so the demo runs from any working directory; its
output goes to ./demo (gitignored in the repository). Re-running it skips finished runs and resumes unfinished
ones (the sweep's own behaviour), so an interrupted demo continues where it stopped. `--quick` runs
configs/sweeps/demo_quick.yaml instead: 4 tiny runs that check the whole path (what the tests use); its
numbers mean nothing.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Optional

from emformer.errors import ConfigError
from emformer.train import rundir
from emformer.train.export.command import export_run
from emformer.train.report import command as report
from emformer.train.sweep.local import run_local
from emformer.train.sweep.spec import LocalOptions, load_spec, prepare_sweep

SPECS = {False: "demo.yaml", True: "demo_quick.yaml"}


def configs_dir() -> Path:
    """The repository's configs/: beside the code of the editable install (train/ -> ../configs)."""
    return Path(__file__).resolve().parents[1] / "configs"


def spec_path(quick: bool) -> Path:
    """The demo's sweep spec in the repository's configs/sweeps/ (never the working directory's)."""
    path = configs_dir() / "sweeps" / SPECS[quick]
    if not path.is_file():
        raise ConfigError(f"the demo's sweep spec {path} is missing: `emformer demo` needs the configs/ folder of "
                          "a repository checkout installed with `pip install -e .` (what `make setup` does); "
                          "a wheel install carries no configs")
    return path


def export_best(sweep: Any, out: Path) -> Optional[Path]:
    """Export the finished run with the lowest final val err (a pretrained example to try the Clusterer on)."""
    best: Optional[tuple[float, Path]] = None
    for point in sweep.points:
        run_dir = sweep.run_dir(point)
        if not rundir.is_done(run_dir):
            continue
        err = (rundir.read_done(run_dir).get("val") or {}).get("err")
        if err is not None and (best is None or err < best[0]):
            best = (float(err), run_dir)
    if best is None:
        return None
    return Path(export_run(best[1], out, onnx=False, which="best"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="demo directory: sweep/ (the runs) and report/ go there (default ./demo, or "
                             "./demo-quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny runs that check the path end to end (seconds)")
    parser.add_argument("--parallel", type=int, default=None, help="runs at once (default: the spec's, 2)")


def run(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else Path("demo-quick" if args.quick else "demo")
    spec = load_spec(spec_path(args.quick))
    local = LocalOptions.from_dict({"parallel": args.parallel if args.parallel is not None else spec.local.parallel,
                                    "threads_per_run": spec.local.threads_per_run}, "--parallel")
    sweep = prepare_sweep(spec, out / "sweep")
    print(f"emformer demo: {len(sweep.points)} training runs ({spec.name}: {spec.source}), {local.parallel} at a "
          f"time with {local.threads_per_run} thread(s) each, in {sweep.dir}", flush=True)
    started = time.monotonic()
    failed = run_local(sweep, sweep.points, parallel=local.parallel, threads=local.threads_per_run)
    trained = time.monotonic() - started
    print(f"emformer demo: training took {trained:.0f} s; building the report", flush=True)
    result = report.build_report(sweep.dir, out / "report")
    print()
    report.print_summary(result)
    model_dir = export_best(sweep, out / "model")
    if model_dir is not None:
        print(f"\nemformer demo: exported the run with the lowest val err to {model_dir}; cluster your own data with "
              f"`emformer cluster {model_dir} points.csv` or `Clusterer.from_pretrained('{model_dir}')`")
    print(f"\nemformer demo: {time.monotonic() - started:.0f} s in all. Open {result.report_path} for the "
          "figures and the rule behind each verdict.")
    if failed:
        print(f"emformer demo: {len(failed)} run(s) failed ({failed}); see their console.log, "
              f"`emformer status {sweep.dir}`, and re-run the demo to resume them")
        return 1
    return result.exit_code
