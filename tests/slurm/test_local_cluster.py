"""Sweeps through a real SLURM (slurm/local-cluster, started by the session fixture in conftest.py).

The shipped configs/sweeps/debug.yaml (2x2 grid of depth x heads, 100 steps) with a small eval set, submitted
with the real `emformer sweep --backend slurm`; the jobs run `emformer train` from this venv. Checks: the
array reaches DONE with the right point per task; a re-submit skips finished points; USR1 makes a task
checkpoint, requeue itself and finish with the metrics of an uninterrupted run; a crashing task shows as
failed with its log tail and `--resubmit-failed` finishes it; SLURM's own errors reach the user.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from emformer.slurm import launcher
from emformer.train.cli import main
from emformer.train.sweep.spec import load_sweep
from emformer.train.sweep.status import point_statuses

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DEBUG_SPEC = str(REPO / "configs" / "sweeps" / "debug.yaml")
# The debug sweep as shipped, with a smaller eval set (the baselines' share of a short run).
FAST = ["eval.episodes=64"]
ONE_POINT = "sweep.grid={model.depth: [1], model.heads: [1]}"  # = point 0 of the debug grid
TIMING_KEYS = {"episodes_per_s", "tokens_per_s", "s_per_step"}
WAIT_S = 480.0  # generous: the CI machine's 2 cores are shared with other test processes


def wait_for(what: str, condition: Callable[[], Any], timeout: float = WAIT_S, poll: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def states(sweep_dir: Path) -> list[str]:
    return [s.state for s in point_statuses(load_sweep(sweep_dir))]


def wait_all_done(sweep_dir: Path) -> None:
    def check() -> bool:
        now = states(sweep_dir)
        assert "failed" not in now, _explain(sweep_dir)
        return all(state == "done" for state in now)

    wait_for(f"every point of {sweep_dir} to be done", check, poll=0.5)


def _explain(sweep_dir: Path) -> str:
    from emformer.train.sweep.status import format_table

    return format_table(point_statuses(load_sweep(sweep_dir), tail_lines=30))


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def sweep(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["sweep", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def grid(slurm_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2x2 debug grid submitted as one array and run to the end."""
    out = tmp_path_factory.mktemp("grid") / "sweep"
    assert main(["sweep", DEBUG_SPEC, *FAST, "--backend", "slurm", "--out", str(out)]) == 0
    wait_all_done(out)
    return out


def test_grid_array_reaches_done_and_resubmit_skips(grid: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = json.loads((grid / "index.json").read_text())["points"]
    assert [p["id"] for p in index] == [0, 1, 2, 3]
    assert [(p["overrides"]["model.depth"], p["overrides"]["model.heads"]) for p in index] == \
        [(1, 1), (1, 2), (2, 1), (2, 2)]
    [record] = launcher.read_submissions(grid)
    assert record["array"] == "0-3%2"
    assert (grid / record["script"]).is_file()
    assert record["points"] == {str(p["id"]): p["run_dir"] for p in index}

    for point in index:
        run_dir = grid / point["run_dir"]
        meta = json.loads((run_dir / "meta.json").read_text())
        # The array task that ran this dir is the point's id, in the array job that was recorded.
        assert meta["slurm"]["SLURM_ARRAY_TASK_ID"] == str(point["id"])
        assert meta["slurm"]["SLURM_ARRAY_JOB_ID"] == record["job_id"]
        config = (run_dir / "config.yaml").read_text()
        assert f"depth: {point['overrides']['model.depth']}\n" in config
        assert "group: debug\n" in config  # one wandb group for the sweep
        assert json.loads((run_dir / "DONE").read_text())["step"] == 100

    statuses = point_statuses(load_sweep(grid))
    assert [(s.state, s.step, s.job_id) for s in statuses] == \
        [("done", 100, f"{record['job_id']}_{i}") for i in range(4)]
    assert all(s.err is not None and 0.0 <= s.err <= 1.0 for s in statuses)
    assert main(["status", str(grid)]) == 0
    table = capsys.readouterr().out
    assert "4 done of 4 points" in table and f"{record['job_id']}_3" in table

    code, out, _ = sweep(DEBUG_SPEC, *FAST, "--backend", "slurm", "--out", str(grid), capsys=capsys)
    assert code == 0
    assert "skipping 4 point(s) already done" in out and "nothing to run" in out
    assert len(launcher.read_submissions(grid)) == 1  # nothing was submitted


def test_usr1_checkpoints_requeues_and_matches_an_uninterrupted_run(
        grid: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "requeue"
    code, _, err = sweep(DEBUG_SPEC, *FAST, ONE_POINT, "--backend", "slurm", "--out", str(out), capsys=capsys)
    assert code == 0, err
    [point] = load_sweep(out).points
    reference = grid / point.run_dir  # the same config (same run name), run without interruption
    assert reference.name == point.name
    run_dir = out / point.run_dir
    task = f"{launcher.read_submissions(out)[0]['job_id']}_0"

    # Signal once the trainer logs its first train row (its handler is installed), well before the end.
    wait_for("the first train row", lambda: any(r["split"] == "train" for r in _rows(run_dir)), poll=0.05)
    signal = subprocess.run(["scancel", "--batch", "--signal=USR1", task], capture_output=True, text=True)
    assert signal.returncode == 0, signal.stderr
    wait_for("the task to be requeued", lambda: states(out) == ["requeued"], timeout=120, poll=0.1)
    wait_all_done(out)

    console = (run_dir / "console.log").read_text()
    assert "preempted at step" in console and "requeued" in console
    preempted_at = int(console.split("preempted at step ")[1].split(":")[0])
    assert 10 <= preempted_at < 100
    assert f"resuming from step {preempted_at}" in console
    meta = json.loads((run_dir / "meta.json").read_text())
    assert [s["step"] for s in meta["starts"]] == [0, preempted_at]
    assert meta["slurm"]["SLURM_RESTART_COUNT"] == "1"

    rows = metric_rows(run_dir)
    keys = [(r["step"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys)), "a step was logged twice after the requeue"
    assert rows == metric_rows(reference)
    assert json.loads((run_dir / "DONE").read_text())["val"] == json.loads((reference / "DONE").read_text())["val"]


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.endswith("}")]


def test_crashed_task_shows_failed_with_log_tail_and_resubmit_failed_finishes_it(
        slurm_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "crash"
    # sbatch exports the submitting environment: the training process dies right after step 50's checkpoint.
    monkeypatch.setenv("EMFORMER_CRASH_AT_STEP", "50")
    code, _, err = sweep(DEBUG_SPEC, *FAST, "sweep.grid={model.depth: [2], model.heads: [2]}", "--backend", "slurm",
                         "--out", str(out), capsys=capsys)
    assert code == 0, err
    monkeypatch.delenv("EMFORMER_CRASH_AT_STEP")
    job = launcher.read_submissions(out)[0]["job_id"]

    wait_for("the task to fail", lambda: states(out) == ["failed"], poll=0.5)
    assert main(["status", str(out)]) == 0
    table = capsys.readouterr().out
    assert re.search(rf"^0 +failed +50/100 +[-0-9.]+ +{job}_0 ", table, re.M), table
    assert "point 0 (" in table and "last lines of runs/" in table
    assert "exit code 1" in table  # srun's own line about the task, from the log tail

    assert main(["status", str(out), "--resubmit-failed"]) == 0
    printed = capsys.readouterr().out
    assert "resubmitted 1 failed point(s) [0]" in printed
    records = launcher.read_submissions(out)
    assert len(records) == 2 and records[1]["job_id"] != job
    wait_all_done(out)
    run_dir = out / load_sweep(out).points[0].run_dir
    assert "resuming from step 50" in (run_dir / "console.log").read_text()
    [status] = point_statuses(load_sweep(out))
    assert (status.state, status.step, status.job_id) == ("done", 100, f"{records[1]['job_id']}_0")


def test_unknown_partition_is_refused_with_the_known_ones(slurm_cluster: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = sweep(DEBUG_SPEC, "sweep.slurm.partition=no_such_partition", "--backend", "slurm",
                         "--out", str(tmp_path / "s"), capsys=capsys)
    assert code == 2
    assert "partition 'no_such_partition' does not exist" in err and f"'{slurm_cluster}'" in err
    assert launcher.read_submissions(tmp_path / "s") == []


def test_a_failing_sbatch_shows_slurms_message(slurm_cluster: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # More memory than the node has: sbatch refuses the job at submission.
    code, _, err = sweep(DEBUG_SPEC, "sweep.slurm.mem=100000G", "--backend", "slurm", "--out", str(tmp_path / "s"),
                         capsys=capsys)
    assert code == 2
    assert "sbatch --parsable" in err and "failed (exit 1)" in err and "sbatch: error:" in err
    assert launcher.read_submissions(tmp_path / "s") == []
