"""`emformer replication STUDY STUDY [--out FILE] [--readme README.md]`: two replications of one study, check by check.

Each STUDY is a study directory (`emformer study --out STUDY`: STUDY/sweep/ with the runs). Both reports are
rebuilt from their run files (STUDY/report.md and its PNGs, as `emformer report STUDY/sweep --out STUDY`
writes them), then one table sets their verdicts side by side: for every check, each replication's estimate,
interval and verdict, and whether they agree. Where they disagree the table says whether each interval
covers the other's estimate (a disagreement inside the noise) or not (a finding). The table goes to --out
(default: docs/replication.md beside the first study) and, with --readme, between the README's markers

    <!-- replication:start -->  ...  <!-- replication:end -->

so the README's leading table is this command's output, never typed by hand. No training: the studies'
committed run files are all it reads.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from emformer.atomic import atomic_write_text
from emformer.errors import ConfigError
from emformer.train.report.build import build_report
from emformer.train.report.result import Check, ReportResult
from emformer.train.report.summary import EM_CHECK

START, END = "<!-- replication:start -->", "<!-- replication:end -->"


@dataclass
class Comparison:
    check: str
    first: Check
    second: Optional[Check]
    points: Optional[tuple[int, int, list[str]]] = None
    """for a check made at every point (model vs EM): (points with the same verdict, points in both, the others)"""

    @property
    def agree(self) -> bool:
        if self.points is not None:
            return self.points[0] == self.points[1]
        return self.second is not None and self.first.verdict == self.second.verdict

    @property
    def note(self) -> str:
        if self.second is None:
            return "not in the replication"
        if self.points is not None:
            same, both, others = self.points
            return f"the same verdict at {same} of {both} points" + (f"; not at {'; '.join(others)}" if others else "")
        if self.agree:
            return "agree"
        a, b = self.first.fit, self.second.fit
        if a is None or b is None or not (a.ok and b.ok):
            return "disagree"
        covers = [a.low <= b.estimate <= a.high, b.low <= a.estimate <= b.high]
        if all(covers):
            return "disagree; each interval covers the other's estimate (within the noise)"
        if any(covers):
            return "disagree; one interval covers the other's estimate"
        return "**disagree; neither interval covers the other's estimate**"


def _points(first: ReportResult, second: ReportResult) -> tuple[int, int, list[str]]:
    """Model-vs-EM verdicts point by point: (the same, points in both, those that differ, with both verdicts)."""
    theirs = {c.point: c.verdict for c in second.sections.em}
    both = [(c.point, c.verdict, theirs[c.point]) for c in first.sections.em if c.point in theirs]
    differ = [f"{point} ({a} / {b})" for point, a, b in both if a != b]
    return len(both) - len(differ), len(both), differ


def compare(first: ReportResult, second: ReportResult) -> list[Comparison]:
    """One row per check of the first report (by name), with the second's row of the same name; the check
    made at every point (model vs EM) compares its verdicts point by point."""
    others = {c.name: c for c in second.checks}
    rows = []
    for check in first.checks:
        every_point = check.name.startswith(EM_CHECK) and check.name in others
        rows.append(Comparison(check.name.strip(), check, others.get(check.name),
                               _points(first, second) if every_point else None))
    return rows


def _cell(check: Optional[Check]) -> str:
    if check is None:
        return "—"
    interval = f" {check.interval}" if check.interval not in ("—", "see below") else ""
    return f"{check.estimate}{interval} **{check.verdict}**"


def table(rows: Sequence[Comparison], names: Sequence[str]) -> str:
    lines = [f"| check | {names[0]} | {names[1]} | |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.check} | {_cell(r.first)} | {_cell(r.second)} | {r.note} |".replace("\n", " ") for r in rows]
    return "\n".join(lines)


def render(rows: Sequence[Comparison], dirs: Sequence[Path], first: ReportResult) -> str:
    agree = sum(r.agree for r in rows)
    method = next((r.first.method for r in rows if r.first.fit is not None), "—")
    return "\n".join([
        f"Made by `emformer replication {' '.join(str(d) for d in dirs)}` from the committed run files "
        f"({len(first.runs)} runs each; reports: {', '.join(f'[{d}/report.md]({d}/report.md)' for d in dirs)}). "
        f"The two replications differ in their training seeds, hence in their training episodes, inits and eval "
        f"sets (each seed has its own). Verdicts agree on {agree} of {len(rows)} checks. Intervals: {method}.",
        "",
        table(rows, [d.name for d in dirs]),
    ]) + "\n"


def replace_block(text: str, block: str, where: str) -> str:
    """`text` with the part between START and END replaced by `block`."""
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ConfigError(f"{where}: no '{START}' ... '{END}' block to write the replication table into")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}{END}{tail}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("studies", nargs=2, type=Path, metavar="STUDY",
                        help="study directories (each with sweep/ inside, as `emformer study --out` makes)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the comparison's markdown file (default: replication.md beside the first study)")
    parser.add_argument("--readme", type=Path, default=None,
                        help=f"also write the table into this file between {START} and {END}")


def run(args: argparse.Namespace) -> int:
    for study in args.studies:
        if not (study / "sweep").is_dir():
            raise ConfigError(f"{study}: not a study directory (expected {study / 'sweep'}, as `emformer study "
                              f"--out {study}` makes)")
    results = [build_report(study / "sweep", study) for study in args.studies]
    rows = compare(*results)
    text = render(rows, args.studies, results[0])
    out = args.out if args.out is not None else args.studies[0].parent / "replication.md"
    atomic_write_text(out, f"# Replication: {args.studies[0].name} and {args.studies[1].name}\n\n{text}")
    if args.readme is not None:
        atomic_write_text(args.readme, replace_block(args.readme.read_text(), text, str(args.readme)))
    print(text)
    print(f"replication: {out}" + (f" and {args.readme}" if args.readme else ""))
    return max(r.exit_code for r in results)
