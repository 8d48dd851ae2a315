"""`emformer demo [--out demo/] [--quick]`: the README's first command (`make demo`).

Runs the repository's configs/sweeps/demo.yaml through the local sweep backend: the sample-complexity check
of DESIGN §3 (N = 512..4096 pool episodes in half octaves, plus fresh episodes) and a depth trend (L = 1, 2, 4 at N = ∞), 2 seeds,
20 CPU runs of 550 steps, 2 at a time with one thread each (docs/demo/ holds a committed result). Then it runs
`emformer report` on the sweep and prints where report.md is, its summary table, and every verdict tagged with
the seeds it rests on (2: indicative only, below the study's bar of 5; `emformer study` makes the real figures).
The best run (selected on the eval set) is exported and its figures printed on the test set (eval.test_seed).
The spec is found next to the installed package (an editable install of a checkout), so the demo runs from any
working directory; its output goes to ./demo (gitignored in the repository). Re-running it skips finished runs
and resumes unfinished ones (the sweep's own behaviour), so an interrupted demo continues where it stopped. `--quick` runs
configs/sweeps/demo_quick.yaml instead: 4 tiny runs that check the whole path (what the tests use); its
numbers mean nothing.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from emformer.errors import ConfigError
from emformer.models.export_format import read_export_config
from emformer.train import rundir
from emformer.train.export.command import export_run
from emformer.train.report import scaling
from emformer.train.report.result import NOT_IN_SWEEP
from emformer.train.report.summary import print_summary
from emformer.train.config import package_configs
from emformer.train.study import train_and_report

SPECS = {False: "demo.yaml", True: "demo_quick.yaml"}


def spec_path(quick: bool) -> Path:
    """The demo's sweep spec in the repository's configs/sweeps/ (never the working directory's)."""
    path = package_configs() / "sweeps" / SPECS[quick]
    if not path.is_file():
        raise ConfigError(f"the demo's sweep spec {path} is missing: `emformer demo` needs the configs/ folder of "
                          "a repository checkout installed with `pip install -e .` (what `make setup` does); "
                          "a wheel install carries no configs")
    return path


def export_best(sweep: Any, out: Path) -> Optional[Path]:
    """Export the finished run with the lowest final val err (selection on the eval set; the export then
    reports its figures on the test set)."""
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


def verdict_lines(result: Any, seeds: int) -> list[str]:
    """Every verdict with the seeds it rests on; below the study's bar each says it is only indicative."""
    bar = scaling.MIN_SEEDS_FOR_BOOTSTRAP
    tag = (f"{seeds} seed{'s' if seeds != 1 else ''}" + (f"; indicative only, below the study's bar of ≥ {bar} seeds"
                                                          if seeds < bar else ""))
    return [f"{c.name.strip()}: {c.verdict} [{tag}]" for c in result.checks if c.verdict != NOT_IN_SWEEP]


def test_summary(model_dir: Path) -> str:
    """The exported model's figures on its test set (eval.test_seed), from the export's config.json."""
    row = read_export_config(model_dir).get("eval") or {}
    if row.get("split") != "test":
        return "no test-set figures in the export"
    return (f"on its test set (eval.test_seed = {row['seed']}, {row['episodes']} episodes; selected on the eval set): "
            f"err {row['err']:.4f}, EM {row['err_em']:.4f} (model − EM {row['err'] - row['err_em']:+.4f} ± "
            f"{row['err_minus_em_se']:.4f} paired SE), oracle {row['err_oracle']:.4f}")


def run(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else Path("demo-quick" if args.quick else "demo")
    path = spec_path(args.quick)
    outcome = train_and_report(path, out, args.parallel)
    result, sweep = outcome.result, outcome.sweep
    print()
    print_summary(result)
    print("\nemformer demo: verdicts (the real figures, from ≥ 5 seeds, are in docs/study/report.md):")
    for line in verdict_lines(result, len(sweep.spec.seeds)):
        print(f"  {line}")
    model_dir = export_best(sweep, out / "model")
    if model_dir is not None:
        print(f"\nemformer demo: exported the run with the lowest val err to {model_dir}; {test_summary(model_dir)}. "
              f"Cluster your own data with `emformer cluster {model_dir} points.csv` or "
              f"`Clusterer.from_pretrained('{model_dir}')`")
    print(f"\nemformer demo: training took {outcome.trained_s:.0f} s. Open {result.report_path} for the "
          "figures and the rule behind each verdict.")
    if outcome.failed:
        print(f"emformer demo: {len(outcome.failed)} run(s) failed ({outcome.failed}); see their console.log, "
              f"`emformer status {sweep.dir}`, and re-run the demo to resume them")
        return 1
    return result.exit_code
