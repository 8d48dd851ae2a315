"""The report's figures and summary table to the sweep's wandb group, only when `--wandb` asks for it.

wandb is a side channel: report.md and its PNGs on disk are the record. A failed upload is reported in one
line (what wandb raised) on the console and never lands in report.md; the report's exit status ignores it.
"""
from __future__ import annotations

import collections
import os
from typing import Sequence

from emformer.train.report.result import ReportResult

MODES = ("auto", "offline", "online", "disabled")


def log_report(result: ReportResult, names: Sequence[str], requested: str) -> str:
    """Log figures and the summary to the sweep's wandb group; returns what was done, in words ('' if off).

    requested: offline | online | disabled, or auto (the mode most of the runs' configs use)."""
    configs = [r.config.get("wandb", {}) for r in result.runs if r.config]
    mode = requested
    if mode == "auto":
        modes = collections.Counter(c.get("mode", "offline") for c in configs)
        mode = modes.most_common(1)[0][0] if modes else "disabled"
    if mode == "disabled" or not result.figures:
        return ""
    groups = collections.Counter(c.get("group") for c in configs if c.get("group"))
    group = groups.most_common(1)[0][0] if groups else names[0]
    project = next((c.get("project") for c in configs if c.get("project")), "emformer")
    entity = next((c.get("entity") for c in configs if c.get("entity")), None)
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb  # heavy, and only when asked

    try:
        run = wandb.init(project=project, entity=entity, group=group, job_type="report", name=f"report-{group}",
                         dir=str(result.out_dir), mode=mode, reinit="finish_previous",
                         config={"sweeps": list(names), "runs": len(result.runs)},
                         settings=wandb.Settings(console="off", x_disable_stats=True))
        run.log({f"report/{name}": wandb.Image(str(path)) for name, path in result.figures.items()})
        run.log({"report/summary": wandb.Table(columns=["check", "estimate", "interval", "target", "verdict"],
                                               data=[[c.name, c.estimate, c.interval, c.target, c.verdict]
                                                     for c in result.checks])})
        run.finish()
    except (wandb.errors.Error, OSError) as exc:  # no key / no network (CommError, AuthenticationError), bad
        # settings (UsageError), or its files under the out directory could not be written
        return f"figures not logged to wandb ({type(exc).__name__}: {exc})"
    return f"figures logged to wandb project {project}, group {group} ({mode})"
