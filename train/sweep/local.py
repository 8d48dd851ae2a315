"""The local backend of `emformer sweep`: run points as subprocesses, K at a time, each with a bounded thread count.

Each run is `python -m emformer train <run_dir>/config.yaml --run-dir <run_dir>`, so skipping a finished point
(DONE) and resuming one with checkpoints/last.ckpt is the trainer's own behaviour; output is appended to
<run_dir>/console.log. Every launch is recorded in <sweep dir>/local/<id>.json (pid, host, exit code) for
`emformer status`. Children get no SLURM_* variables (a local sweep inside an allocation is not a SLURM job
per run) and their own session, so Ctrl-C reaches only this process, which then sends each run SIGUSR1:
the trainer checkpoints and exits, and the next `emformer sweep` resumes it.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from emformer.train import rundir
from emformer.train.sweep.spec import Point, Sweep

STOP_GRACE_S = 60.0
"""after Ctrl-C, how long runs get to checkpoint before they are killed"""


def train_command(point_config: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "emformer", "train", str(point_config), "--run-dir", str(run_dir)]


def child_environment(threads: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[key] = str(threads)
    return env


def run_local(
    sweep: Sweep,
    points: Sequence[Point],
    parallel: int = 1,
    threads: int = 1,
    command: Callable[[Path, Path], list[str]] = train_command,
    poll_s: float = 0.2,
    say: Callable[[str], None] = print,
) -> list[int]:
    """Run `points` (skipping any with DONE), at most `parallel` at once; the ids that failed."""
    queue = [p for p in points if not rundir.is_done(sweep.run_dir(p))]
    if len(queue) < len(points):
        say(f"skipping {len(points) - len(queue)} point(s) with DONE")
    running: dict[int, tuple[Point, subprocess.Popen, float, Any]] = {}
    failed: list[int] = []
    finished = 0
    started_all = time.monotonic()
    try:
        while queue or running:
            while queue and len(running) < parallel:
                point = queue.pop(0)
                running[point.id] = (point, *_start(sweep, point, threads, command))
                resuming = " (resuming from last.ckpt)" if _has_checkpoint(sweep, point) else ""
                say(f"[{finished}/{len(points)}] started point {point.id} {point.name}{resuming}")
            time.sleep(poll_s)
            for point_id, (point, process, started, log) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                log.close()
                del running[point_id]
                finished += 1
                _finish_record(sweep, point, code)
                done = rundir.is_done(sweep.run_dir(point))
                if code != 0 or not done:
                    failed.append(point.id)
                what = "done" if code == 0 and done else (f"FAILED (exit {code})" if code else "stopped before DONE")
                say(f"[{finished}/{len(points)}] point {point.id} {point.name}: {what} in "
                    f"{time.monotonic() - started:.1f} s (log: {sweep.run_dir(point) / 'console.log'})")
    except KeyboardInterrupt:
        _stop(sweep, running, say)
        raise
    say(f"{len(points)} point(s) in {time.monotonic() - started_all:.1f} s: {len(points) - len(failed)} done, "
        f"{len(failed)} failed" + (f" ({failed}; `emformer status {sweep.dir} --resubmit-failed`)" if failed else ""))
    return failed


def _has_checkpoint(sweep: Sweep, point: Point) -> bool:
    return rundir.checkpoint_path(sweep.run_dir(point), "last").exists()


def _start(sweep: Sweep, point: Point, threads: int, command: Callable[[Path, Path], list[str]]):
    run_dir = sweep.run_dir(point).resolve()
    log = open(run_dir / rundir.CONSOLE_LOG, "a", buffering=1)
    log.write(f"[emformer sweep] {time.strftime('%Y-%m-%dT%H:%M:%S%z')} local launch on {socket.gethostname()}\n")
    argv = command(rundir.config_path(run_dir), run_dir)
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=child_environment(threads), start_new_session=True)
    rundir.write_launch_record(sweep.dir, point.id, {
        "backend": "local", "pid": process.pid, "host": socket.gethostname(), "command": argv,
        "started_at": time.time(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "exit_code": None, "ended_at": None,
    })
    return process, time.monotonic(), log


def _finish_record(sweep: Sweep, point: Point, code: int) -> None:
    record = rundir.read_launch_record(sweep.dir, point.id) or {"backend": "local"}
    record.update(exit_code=code, ended_at=time.time())
    rundir.write_launch_record(sweep.dir, point.id, record)


def _stop(sweep: Sweep, running: dict, say: Callable[[str], None]) -> None:
    """Ctrl-C: ask every run to checkpoint and exit (SIGUSR1), kill what is left after STOP_GRACE_S."""
    if not running:
        return
    say(f"interrupted: asking {len(running)} run(s) to checkpoint and stop (up to {STOP_GRACE_S:.0f} s; "
        "Ctrl-C again kills them)")
    for _, process, _, _ in running.values():
        # The trainer only: dataloader workers have no handler, and USR1 would kill them.
        if process.poll() is None:
            process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + STOP_GRACE_S
    try:
        while any(p.poll() is None for _, p, _, _ in running.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    for point, process, _, log in running.values():
        if process.poll() is None:
            _signal(process, signal.SIGKILL)
            process.wait()
        log.close()
        _finish_record(sweep, point, process.returncode)
    running.clear()


def _signal(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # its own session: the run and any dataloader workers it left
    except ProcessLookupError:
        pass
