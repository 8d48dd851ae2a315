"""What `emformer report` computes, as typed rows: the checks of each section, the summary table and the
files written. The summary, the markdown and the wandb upload all read these; none of them recomputes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from emformer.train.report import checks, scaling
from emformer.train.report.records import RunRecord

FIGURES = {"curves": "curves.png", "sample_complexity": "sample_complexity.png", "depth_heads": "depth_heads.png",
           "separation": "separation.png", "passes": "passes_em.png"}
NOT_IN_SWEEP = "not in this sweep"


@dataclass
class Check:
    """One row of the summary table."""

    name: str
    figure: str
    estimate: str
    interval: str
    target: str
    verdict: str
    sentence: str
    method: str = "—"
    """how the interval was made, e.g. "95% t (3 seeds)" (scaling.Interval.label)"""
    fit: Optional[scaling.Interval] = None
    """the interval itself, where the row has one (a replication compares them)"""


@dataclass(frozen=True)
class Sections:
    """The numbers behind each section of the report (checks.py); None or [] where the sweep has no family."""

    points: list[checks.Point]
    sample_complexity: Optional[checks.SampleComplexity]
    depth: list[checks.AxisTrend]
    heads: list[checks.AxisTrend]
    separation: list[checks.SeparationTrend]
    beyond: Optional[list[checks.SettingRow]]
    em: list[checks.EmComparison]
    passes: list[checks.PassesAgainstEm]


@dataclass
class ReportResult:
    out_dir: Path
    report_path: Path
    figures: dict[str, Path]
    checks: list[Check]
    runs: list[RunRecord]
    problems: list[str]
    """corrupt metrics lines / unreadable configs or index (FILE:LINE: what)"""
    sections: Sections
    wandb: str = ""
    """what the wandb upload did, in words ('' when it was not asked for)"""

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0
