"""Building the report: read the sweep dir(s), compute every check (checks.py), draw the figures (plots.py),
write report.md (markdown.py) and, when asked, log to wandb (wandb_log.py). `build_report` is what
`emformer report`, `emformer study` and `emformer demo` call."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from emformer.atomic import atomic_write_text
from emformer.errors import ConfigError
from emformer.train import rundir
from emformer.train.report import checks, markdown, records
from emformer.train.report import shift as report_shift
from emformer.train.report.records import RunRecord
from emformer.train.report.result import FIGURES, ReportResult, Sections
from emformer.train.report.summary import summary_rows
from emformer.train.report.wandb_log import log_report


def _read_sweep(directory: Path) -> tuple[list[RunRecord], list[str]]:
    if rundir.has_config(directory) and not rundir.run_dirs_on_disk(directory):
        raise ConfigError(f"{directory} is one run's directory ({rundir.CONFIG}, no runs inside): `emformer report` "
                          "checks a sweep against the theory and needs a sweep directory (what `emformer sweep "
                          "--out DIR` writes: DIR/runs/*/); a single run's curves are in its "
                          f"{rundir.METRICS} and curves.png")
    found, index_problems = records.read_sweep(directory)
    if not found:
        raise ConfigError(f"{directory}: no runs found (expected run directories with config.yaml, "
                          f"e.g. {directory}/runs/*/config.yaml, or an index.json naming them)")
    return found, index_problems


def build_report(sweep_dir: str | Path | Sequence[str | Path], out_dir: str | Path | None = None, *,
                 wandb_mode: str = "disabled", test_shifts: Sequence[str] = ()) -> ReportResult:
    """Read the sweep dir(s), compute every check, write report.md + PNGs to out_dir (default: the first
    sweep dir's `report/`), log the figures to wandb when `wandb_mode` is not disabled (wandb_log.MODES);
    return what was written.

    `test_shifts` ("task.n=128", "task.k=3,task.n=32", ...): also evaluate every complete run's checkpoint on
    its task with these values at test time, against EM on the same episodes (report.shift)."""
    sweep_dirs = [Path(sweep_dir)] if isinstance(sweep_dir, (str, Path)) else [Path(p) for p in sweep_dir]
    if not sweep_dirs:
        raise ConfigError("report: give at least one sweep directory")
    runs: list[RunRecord] = []
    problems: list[str] = []
    for directory in sweep_dirs:
        found, index_problems = _read_sweep(directory)
        runs += found
        problems += index_problems
    problems += [p for run in runs for p in run.problems]
    shifted = []
    if test_shifts:
        shifted = report_shift.evaluate_shifts(runs, [report_shift.parse_shift(t) for t in test_shifts])
        problems += [r.problem for r in shifted if r.problem]
    out = Path(out_dir) if out_dir is not None else sweep_dirs[0] / "report"
    out.mkdir(parents=True, exist_ok=True)

    points = checks.group_points(runs)
    margin = records.smallest_effect(sweep_dirs[0], checks.DEFAULT_SMALLEST_EFFECT)
    sections = Sections(points=points, sample_complexity=checks.sample_complexity(points, runs),
                        depth=checks.axis_trends(points, "model.depth", runs, margin),
                        heads=checks.axis_trends(points, "model.heads", runs, margin),
                        separation=checks.separation_trends(points, runs),
                        beyond=checks.beyond_theory(points, shifted),
                        em=checks.em_comparisons(points), passes=checks.passes_against_em(points))

    from emformer.train.report import plots  # matplotlib only when there is something to draw

    figures: dict[str, Path] = {}
    if points:
        figures["curves"] = plots.curves(points, out / FIGURES["curves"])
    if sections.sample_complexity:
        figures["sample_complexity"] = plots.sample_complexity(sections.sample_complexity,
                                                               out / FIGURES["sample_complexity"])
    if sections.depth or sections.heads:
        figures["depth_heads"] = plots.axis_trends(sections.depth, sections.heads, out / FIGURES["depth_heads"])
    if sections.separation:
        figures["separation"] = plots.separation(sections.separation, out / FIGURES["separation"])
    if sections.passes:
        figures["passes"] = plots.passes_against_em(sections.passes, out / FIGURES["passes"])

    names = [records.sweep_name(d) for d in sweep_dirs]
    result = ReportResult(out, out / "report.md", figures, summary_rows(sections), runs, problems, sections)
    atomic_write_text(result.report_path, markdown.render(result, sweep_dirs, names))
    result.wandb = log_report(result, names, wandb_mode)
    return result
