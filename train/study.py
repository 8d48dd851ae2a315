"""`emformer study [--out study] [--spec SPEC] [--parallel K]`: the CPU study of the theory (`make study`).

Runs configs/sweeps/study.yaml (the four checks of DESIGN §3 from ≥ 5 seeds: sample complexity, depth L,
heads M and separation Δ; its header states the sizing) through the local sweep backend into OUT/sweep, then
writes the report beside it: OUT/report.md and its PNGs (OUT is the study's one directory, so the report
is where the study is: docs/study/report.md for the committed one). Resumable: a re-run skips every run with DONE and
resumes unfinished ones from checkpoints/last.ckpt, so an interrupted study loses at most one checkpoint
interval per run. A finished run is recognised by its config.yaml and DONE alone (no checkpoint needed), so
the committed copy in docs/study/ (the run dirs' small files only: config, meta, metrics log, DONE) is skipped
by `emformer study --out docs/study`, and `emformer report docs/study/sweep --out docs/study` rebuilds the same
report from a fresh clone without training.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from emformer.train.config import package_configs
from emformer.train.report.build import build_report
from emformer.train.report.result import ReportResult
from emformer.train.report.summary import print_summary
from emformer.train.sweep.local import run_local
from emformer.train.sweep.spec import LocalOptions, Sweep, load_spec, prepare_sweep
from emformer.train.sweep.status import points_to_run

SPEC = "study.yaml"


@dataclass
class Outcome:
    sweep: Sweep
    result: ReportResult
    failed: list[int]
    trained_s: float


def train_and_report(spec_path: Path, out: Path, parallel: Optional[int] = None,
                     report_dir: Optional[Path] = None, overrides: Sequence[str] = ()) -> Outcome:
    """Prepare OUT/sweep from the spec (and `overrides`, as `emformer sweep` takes them), train what is not
    done yet (K at a time, the spec's threads each), and write the report to `report_dir` (default
    OUT/report). Shared by `emformer study` and `emformer demo`."""
    spec = load_spec(spec_path, overrides)
    local = LocalOptions.from_dict({"parallel": parallel if parallel is not None else spec.local.parallel,
                                    "threads_per_run": spec.local.threads_per_run}, "--parallel")
    sweep = prepare_sweep(spec, out / "sweep")
    todo, skipped = points_to_run(sweep)
    skipped_text = ", ".join(f"{len(ids)} {state}" for state, ids in sorted(skipped.items())) or "none"
    print(f"emformer {spec.name}: {len(sweep.points)} runs in {sweep.dir} ({spec.source}); {len(todo)} to run, "
          f"skipped: {skipped_text}; {local.parallel} at a time with {local.threads_per_run} thread(s) each",
          flush=True)
    started = time.monotonic()
    failed = run_local(sweep, todo, parallel=local.parallel, threads=local.threads_per_run) if todo else []
    trained = time.monotonic() - started
    print(f"emformer {spec.name}: training took {trained:.0f} s; building the report", flush=True)
    result = build_report(sweep.dir, report_dir if report_dir is not None else out / "report")
    return Outcome(sweep, result, failed, trained)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("study"),
                        help="study directory: sweep/ (the runs), report.md and its PNGs go there (default ./study)")
    parser.add_argument("--spec", type=Path, default=None,
                        help=f"sweep spec (default: the repository's configs/sweeps/{SPEC})")
    parser.add_argument("--parallel", type=int, default=None, help="runs at once (default: the spec's, 2)")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="spec or run config overrides as `emformer sweep` takes them, e.g. sweep.seeds=[5,6,7,8,9] "
                             "(the replication: `make study-replication`)")


def run(args: argparse.Namespace) -> int:
    spec_path = args.spec if args.spec is not None else package_configs() / "sweeps" / SPEC
    outcome = train_and_report(spec_path, args.out, args.parallel, report_dir=args.out, overrides=args.overrides)
    print()
    print_summary(outcome.result)
    if outcome.failed:
        print(f"emformer study: {len(outcome.failed)} run(s) failed ({outcome.failed}); see their console.log, "
              f"`emformer status {outcome.sweep.dir}`, and re-run the study to resume them")
        return 1
    return outcome.result.exit_code
