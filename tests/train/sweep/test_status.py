"""`emformer status`: the state of each point from its run dir and its latest launch (no training here: the
run dirs are written as the trainer and the backends write them; the SLURM states are covered by
tests/slurm/test_local_cluster.py against a real SLURM)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emformer.atomic import atomic_write_json
from emformer.slurm import launcher
from emformer.train.cli import main
from emformer.train.sweep.spec import Sweep, load_spec, prepare_sweep
from emformer.train.sweep.status import format_table, point_statuses, points_to_run, read_progress, tail

DEBUG_SPEC = Path(__file__).resolve().parents[3] / "configs" / "sweeps" / "debug.yaml"


@pytest.fixture
def sweep(tmp_path: Path) -> Sweep:
    return prepare_sweep(load_spec(DEBUG_SPEC), tmp_path / "s")


def write_metrics(run_dir: Path, rows: list[dict], torn: str = "") -> None:
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)


def local_record(sweep: Sweep, point_id: int, pid: int, exit_code: int | None) -> None:
    atomic_write_json(sweep.dir / "local" / f"{point_id}.json",
                      {"backend": "local", "pid": pid, "host": socket.gethostname(), "command": [],
                       "started_at": time.time(), "exit_code": exit_code, "ended_at": None})


def test_progress_reads_the_last_step_and_val_err_and_ignores_a_torn_line(tmp_path: Path) -> None:
    write_metrics(tmp_path, [{"step": 0, "split": "val", "err": 0.5}, {"step": 10, "split": "train", "loss": 1.0},
                             {"step": 50, "split": "val", "err": 0.25}], torn='{"step": 60, "spl')
    assert read_progress(tmp_path) == (50, 0.25)
    assert read_progress(tmp_path / "missing") == (None, None)


def test_tail_treats_progress_bar_returns_as_line_ends(tmp_path: Path) -> None:
    (tmp_path / "log").write_text("a\nb\rc\r\n\nd\n")
    assert tail(tmp_path / "log", 3) == ["b", "c", "d"]
    assert tail(tmp_path / "nothing", 3) == []


def test_states_of_local_points(sweep: Sweep, capsys: pytest.CaptureFixture[str]) -> None:
    p0, p1, p2, p3 = (sweep.run_dir(p) for p in sweep.points)
    # 0: done. 1: failed (exit 1) with a log. 2: running (a live `emformer train` process). 3: never launched.
    write_metrics(p0, [{"step": 100, "split": "val", "err": 0.08}])
    (p0 / "DONE").write_text("{}")
    local_record(sweep, 0, 1, 0)
    write_metrics(p1, [{"step": 50, "split": "val", "err": 0.2}])
    (p1 / "console.log").write_text("emformer train: from scratch\nTraceback (most recent call last):\nBoom: bad\n")
    local_record(sweep, 1, 1, 1)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "emformer", "train"])
    try:
        local_record(sweep, 2, live.pid, None)
        statuses = point_statuses(sweep)
        assert [(s.state, s.step, s.err) for s in statuses] == [
            ("done", 100, 0.08), ("failed", 50, 0.2), ("running", None, None), ("not submitted", None, None)]
        assert statuses[1].detail == "exit 1" and statuses[1].log_tail[-1] == "Boom: bad"
        assert [p.id for p in points_to_run(sweep)[0]] == [1, 3]  # neither done nor running

        assert main(["status", str(sweep.dir)]) == 0
        table = capsys.readouterr().out
        assert table.splitlines()[0].split() == ["id", "state", "steps", "err", "job", "depth", "heads", "seed", "run"]
        assert "1 not submitted, 1 running, 1 done, 1 failed of 4 points" in table
        assert f"point 1 ({sweep.points[1].name}) failed: exit 1; last lines of" in table
        assert "    Boom: bad" in table

        assert main(["status", str(sweep.dir), "--json"]) == 0
        as_json = json.loads(capsys.readouterr().out)
        assert [s["state"] for s in as_json] == ["done", "failed", "running", "not submitted"]
    finally:
        live.kill()
        live.wait()
    # The process is gone without an exit code (killed with its launcher): failed, not running forever.
    [_, _, gone, _] = point_statuses(sweep)
    assert gone.state == "failed" and "without an exit code" in gone.detail


def test_slurm_points_are_unknown_where_slurm_cannot_be_asked(sweep: Sweep, monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    launcher.record_submission(sweep.dir, {"job_id": "77", "array": "0-1%2", "submitted_at": time.time(),
                                           "points": {"0": sweep.points[0].run_dir, "1": sweep.points[1].run_dir},
                                           "script": "slurm/sweep-001.sbatch"})
    (sweep.run_dir(sweep.points[1]) / "DONE").write_text("{}")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no scontrol
    statuses = point_statuses(sweep)
    assert [(s.state, s.job_id) for s in statuses] == [("unknown", "77_0"), ("done", "77_1"), ("not submitted", None),
                                                         ("not submitted", None)]
    # Not resubmitted from here: it may still be running on the cluster.
    todo, skipped = points_to_run(sweep)
    assert [p.id for p in todo] == [2, 3] and skipped == {"unknown": [0], "done": [1]}
    assert "2 not submitted, 1 done, 1 unknown of 4 points" in format_table(statuses)


def test_resubmit_failed_with_nothing_failed_does_nothing(sweep: Sweep, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", str(sweep.dir), "--resubmit-failed"]) == 0
    assert "no failed points to resubmit" in capsys.readouterr().out
    assert launcher.read_submissions(sweep.dir) == []


def test_a_failed_sbatch_leaves_points_not_submitted_and_says_how_to_resubmit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """sbatch refuses (no such partition, no account ...): the command fails with SLURM's words, nothing is
    recorded, and status shows the points as not submitted (never as pending, as if queued)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", "echo 'sbatch: error: invalid partition specified: gpu' >&2; exit 1"),
                       ("sinfo", "echo gpu; exit 0"), ("scontrol", "exit 0")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    out = tmp_path / "s"
    assert main(["sweep", str(DEBUG_SPEC), "--out", str(out), "--backend", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "invalid partition specified" in err and "nothing was submitted" in err and len(err.splitlines()) == 1
    assert launcher.read_submissions(out) == []
    assert main(["status", str(out)]) == 0
    table = capsys.readouterr().out
    assert "pending" not in table
    points = len(prepare_sweep(load_spec(DEBUG_SPEC), out).points)
    assert f"{points} not submitted of {points} points" in table
    assert "run the same `emformer sweep SPEC --out SWEEP_DIR [--backend slurm]` again" in table
