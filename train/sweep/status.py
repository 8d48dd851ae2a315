"""`emformer status SWEEP_DIR`: where every point of a sweep stands, from its run dir and from SLURM.

States: not submitted (never launched: no local start, no SLURM submission, e.g. sbatch failed) · pending
(waiting in the SLURM queue) · running · requeued (preempted, waiting to resume from last.ckpt) · done (DONE
written) · failed (its last launch ended without DONE: the tail of its log says why) · unknown (submitted to
SLURM, but SLURM cannot be asked here). `emformer sweep` run again submits the not-submitted and failed ones.
The run dir is the truth for done/steps/err; the latest launch (local/<id>.json or slurm/submissions.json)
with `scontrol` says pending/running/requeued/failed. Light: no torch, no lightning.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from emformer.errors import ConfigError
from emformer.slurm import launcher
from emformer.train import rundir
from emformer.train.sweep.local import run_local
from emformer.train.sweep.slurm_backend import submit_slurm
from emformer.train.sweep.spec import Point, Sweep, load_sweep

NOT_SUBMITTED = "not submitted"
STATES = (NOT_SUBMITTED, "pending", "running", "requeued", "done", "failed", "unknown")


@dataclass
class PointStatus:
    id: int
    name: str
    run_dir: str
    state: str
    overrides: dict[str, Any]
    seed: int
    step: Optional[int] = None
    """the last step in the run's metrics log"""
    max_steps: Optional[int] = None
    err: Optional[float] = None
    """misclustering rate of the latest val row"""
    backend: Optional[str] = None
    """local | slurm: where it was last launched"""
    job_id: Optional[str] = None
    """SLURM <array job>_<task> of the latest submission"""
    detail: str = ""
    log: Optional[str] = None
    """the log whose tail is shown for a failed point (relative to the sweep dir)"""
    log_tail: list[str] = field(default_factory=list)


def read_progress(run_dir: Path) -> tuple[Optional[int], Optional[float]]:
    """(last step, err of the last val row) from the run's metrics log; a half-written last line is ignored."""
    step = err = None
    for row in rundir.read_metrics(run_dir):
        if not isinstance(row.get("step"), int):
            continue
        step = row["step"] if step is None else max(step, row["step"])
        if row.get("split") == "val" and isinstance(row.get("err"), (int, float)):
            err = float(row["err"])
    return step, err


def tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines; progress-bar carriage returns count as line ends."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    parts = [p.rstrip() for p in re.split(r"[\r\n]+", text)]
    return [p for p in parts if p.strip()][-lines:]


def _max_steps(run_dir: Path) -> Optional[int]:
    try:
        return int(rundir.read_config(run_dir)["trainer"]["max_steps"])
    except (ConfigError, KeyError, TypeError, ValueError):
        return None


def _local_alive(record: dict[str, Any]) -> bool:
    if record.get("host") != socket.gethostname():
        return True  # cannot check another host's process: trust the record
    pid = record.get("pid")
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, TypeError, ValueError):
        return False
    return b"emformer" in cmdline and b"train" in cmdline and stat.split(")")[-1].split()[0] != "Z"


def point_statuses(sweep: Any, query_slurm: bool = True, tail_lines: int = 10) -> list[PointStatus]:
    """The status of every point of `sweep` (an emformer.train.sweep.Sweep)."""
    latest_slurm: dict[int, tuple[float, str]] = {}
    for record in launcher.read_submissions(sweep.dir):
        for point_id in record.get("points", {}):
            latest_slurm[int(point_id)] = (float(record.get("submitted_at", 0)), f"{record['job_id']}_{point_id}")
    tasks: dict[str, launcher.TaskState] | None = {}
    if query_slurm and latest_slurm:
        tasks = launcher.array_task_states({job.split("_")[0] for _, job in latest_slurm.values()})

    statuses = []
    for point in sweep.points:
        run_dir = sweep.run_dir(point)
        step, err = read_progress(run_dir)
        status = PointStatus(point.id, point.name, point.run_dir, NOT_SUBMITTED, point.overrides, point.seed,
                             step=step, max_steps=_max_steps(run_dir), err=err)
        local = rundir.read_launch_record(sweep.dir, point.id)
        slurm = latest_slurm.get(point.id)
        if slurm is not None and (local is None or slurm[0] >= float(local.get("started_at", 0))):
            status.backend, status.job_id = "slurm", slurm[1]
        elif local is not None:
            status.backend = "local"
        log = run_dir / rundir.CONSOLE_LOG

        if rundir.is_done(run_dir):
            status.state = "done"
        elif status.backend == "slurm":
            task = None if tasks is None else tasks.get(status.job_id or "")
            if tasks is None:
                status.state, status.detail = "unknown", "SLURM cannot be asked here (scontrol missing or failing)"
            elif task is None:
                status.state, status.detail = "failed", "job no longer known to SLURM and no DONE"
            elif task.requeued:
                status.state, status.detail = "requeued", f"restart {task.restarts}, {task.reason}"
            elif task.state == "PENDING":
                status.state, status.detail = "pending", task.reason
            elif task.state in launcher.ACTIVE_STATES:
                status.state = "running"
            elif task.state == "COMPLETED":
                status.state, status.detail = "failed", "job completed without DONE"
            else:
                status.state, status.detail = "failed", f"{task.state} (exit {task.exit_code})"
            if status.state == "failed":
                array_job, task_id = (status.job_id or "_").split("_", 1)
                slurm_log = sweep.dir / "slurm" / "logs" / f"{array_job}_{task_id}.out"
                if not tail(log, 1) and slurm_log.exists():
                    log = slurm_log
        elif status.backend == "local":
            code = local.get("exit_code") if local else None
            if code is None:
                if _local_alive(local or {}):
                    status.state, status.detail = "running", f"pid {local.get('pid')}" if local else ""
                else:
                    status.state, status.detail = "failed", "process gone without an exit code (killed?)"
            elif code != 0:
                status.state, status.detail = "failed", f"exit {code}"
            else:
                status.state, status.detail = "failed", "stopped before DONE (resumes from last.ckpt)"
        if status.state == "failed":
            status.log = os.path.relpath(log, sweep.dir)
            status.log_tail = tail(log, tail_lines)
        statuses.append(status)
    return statuses


# -------------------------------------------------------------------------------------------------- table

def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def points_to_run(sweep: Sweep, ids: Sequence[int] | None = None) -> tuple[list[Point], dict[str, list[int]]]:
    """Points (of `ids`, default all) that are neither done nor active; and the skipped ids by reason."""
    wanted = set(ids) if ids is not None else None
    todo: list[Point] = []
    skipped: dict[str, list[int]] = {}
    for point, status in zip(sweep.points, point_statuses(sweep)):
        if wanted is not None and point.id not in wanted:
            continue
        # "unknown": submitted to SLURM, which cannot be asked from here: running it again could double it.
        if status.state in ("done", "running", "requeued", "unknown") or (status.state == "pending" and status.job_id):
            skipped.setdefault(status.state, []).append(point.id)
        else:
            todo.append(point)
    return todo, skipped


def format_table(statuses: Sequence[PointStatus]) -> str:
    keys = list(dict.fromkeys(k for s in statuses for k in s.overrides))
    short = _short_keys(keys)
    header = ["id", "state", "steps", "err", "job", *(short[k] for k in keys), "seed", "run"]
    rows = []
    for s in statuses:
        steps = "-" if s.step is None else str(s.step)
        if s.max_steps is not None:
            steps += f"/{s.max_steps}"
        rows.append([str(s.id), s.state, steps, "-" if s.err is None else f"{s.err:.4f}", s.job_id or "-",
                     *(json.dumps(s.overrides[k]) if k in s.overrides else "" for k in keys), str(s.seed), s.name])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    counts = {state: sum(s.state == state for s in statuses) for state in STATES}
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items() if n) + f" of {len(statuses)} points")
    if counts[NOT_SUBMITTED]:
        lines.append(f"{counts[NOT_SUBMITTED]} point(s) were never launched (a failed sbatch, or a sweep stopped "
                     "before starting them): run the same `emformer sweep SPEC --out SWEEP_DIR [--backend slurm]` "
                     "again; it launches only the points that are not done, queued or running")
    for s in statuses:
        if s.state == "failed":
            lines.append(f"\npoint {s.id} ({s.name}) failed: {s.detail}" + (f"; last lines of {s.log}:" if s.log else ""))
            lines.extend(f"    {line}" for line in s.log_tail)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory (made by `emformer sweep`)")
    parser.add_argument("--json", action="store_true", help="print the statuses as JSON")
    parser.add_argument("--tail", type=int, default=10, help="log lines shown for a failed point")
    parser.add_argument("--resubmit-failed", action="store_true",
                        help="run the failed points again (they resume from last.ckpt)")
    parser.add_argument("--backend", choices=("local", "slurm"), default=None,
                        help="with --resubmit-failed: where (default: where each point last ran)")


def run(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep_dir)
    statuses = point_statuses(sweep, tail_lines=args.tail)
    if args.json:
        print(json.dumps([asdict(s) for s in statuses], indent=2))
    else:
        print(format_table(statuses))
    if not args.resubmit_failed:
        return 0
    return resubmit_failed(sweep, statuses, args.backend)


def resubmit_failed(sweep: Any, statuses: Sequence[PointStatus], backend: Optional[str] = None) -> int:
    failed = [s for s in statuses if s.state == "failed"]
    if not failed:
        print("no failed points to resubmit")
        return 0
    by_backend: dict[str, list] = {}
    for s in failed:
        by_backend.setdefault(backend or s.backend or "local", []).append(sweep.point(s.id))
    code = 0
    if "slurm" in by_backend:
        points = by_backend["slurm"]
        records = launcher.read_submissions(sweep.dir)
        workdir = Path(records[-1]["workdir"]) if records and records[-1].get("workdir") else None
        job_id = submit_slurm(sweep, points, workdir=workdir)
        print(f"resubmitted {len(points)} failed point(s) {[p.id for p in points]} as job {job_id}")
    if "local" in by_backend:
        points = by_backend["local"]
        print(f"rerunning {len(points)} failed point(s) {[p.id for p in points]} locally")
        local = sweep.spec.local
        code = 1 if run_local(sweep, points, parallel=local.parallel, threads=local.threads_per_run) else 0
    return code


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="emformer status")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
