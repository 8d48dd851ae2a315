"""Sweeps through a real SLURM (slurm/local-cluster, started with 2 nodes by the session fixture in conftest.py).

The shipped configs/sweeps/debug.yaml (2x2 grid of depth x heads) with fewer steps and a small eval set,
submitted with the real `emformer sweep --backend slurm`; the jobs run `emformer train` from this venv.
Checks: the array reaches DONE with the right point per task; a re-submit skips finished points; a point run
as 2 nodes x 1 task equals the same point run as 1 node x 2 processes; USR1 makes that 2-node job checkpoint,
requeue itself and finish with the metrics of the uninterrupted run; a crashing task shows as failed with its
log tail and `--resubmit-failed` finishes it; SLURM's own errors reach the user.
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
# The debug sweep as shipped, shorter (60 steps: val at 0 and 60, checkpoints at 30 and 60) and with a smaller
# eval set (the baselines' share of a short run): most of a run's time is starting Python and evaluating.
STEPS = 60
FAST = ["eval.episodes=64", f"trainer.max_steps={STEPS}", f"trainer.val_every={STEPS}",
        f"trainer.ckpt_every={STEPS // 2}"]
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
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; SLURM's queue:\n{_queue()}")


def _queue() -> str:
    """squeue with each job's state and why it waits (a job pending on Resources names what holds them)."""
    done = subprocess.run(["squeue", "-a", "-o", "%.12i %.9T %.20R %.10M %.10l %N"], capture_output=True, text=True)
    return done.stdout + done.stderr


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
        assert json.loads((run_dir / "DONE").read_text())["step"] == STEPS

    statuses = point_statuses(load_sweep(grid))
    assert [(s.state, s.step, s.job_id) for s in statuses] == \
        [("done", STEPS, f"{record['job_id']}_{i}") for i in range(4)]
    assert all(s.err is not None and 0.0 <= s.err <= 1.0 for s in statuses)
    assert main(["status", str(grid)]) == 0
    table = capsys.readouterr().out
    assert "4 done of 4 points" in table and f"{record['job_id']}_3" in table

    code, out, _ = sweep(DEBUG_SPEC, *FAST, "--backend", "slurm", "--out", str(grid), capsys=capsys)
    assert code == 0
    assert "skipping 4 point(s) already done" in out and "nothing to run" in out
    assert len(launcher.read_submissions(grid)) == 1  # nothing was submitted


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
    # sbatch exports the submitting environment: the training process dies right after step 30's checkpoint.
    monkeypatch.setenv("EMFORMER_CRASH_AT_STEP", str(STEPS // 2))
    code, _, err = sweep(DEBUG_SPEC, *FAST, "sweep.grid={model.depth: [2], model.heads: [2]}", "--backend", "slurm",
                         "--out", str(out), capsys=capsys)
    assert code == 0, err
    monkeypatch.delenv("EMFORMER_CRASH_AT_STEP")
    job = launcher.read_submissions(out)[0]["job_id"]

    wait_for("the task to fail", lambda: states(out) == ["failed"], poll=0.5)
    assert main(["status", str(out)]) == 0
    table = capsys.readouterr().out
    assert re.search(rf"^0 +failed +{STEPS // 2}/{STEPS} +[-0-9.]+ +{job}_0 ", table, re.M), table
    assert "point 0 (" in table and "last lines of runs/" in table
    assert "exit code 1" in table  # srun's own line about the task, from the log tail

    assert main(["status", str(out), "--resubmit-failed"]) == 0
    printed = capsys.readouterr().out
    assert "resubmitted 1 failed point(s) [0]" in printed
    records = launcher.read_submissions(out)
    assert len(records) == 2 and records[1]["job_id"] != job
    wait_all_done(out)
    run_dir = out / load_sweep(out).points[0].run_dir
    assert f"resuming from step {STEPS // 2}" in (run_dir / "console.log").read_text()
    [status] = point_statuses(load_sweep(out))
    assert (status.state, status.step, status.job_id) == ("done", STEPS, f"{records[1]['job_id']}_0")


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


# ------------------------------------------------------------------------------ two nodes on this host
# The debug point on 2 SLURM nodes x 1 task (n1, n2 of `up.sh --nodes 2`: one rank on each slurmd) against the
# same point as 1 node x 2 processes (the local backend: Lightning starts the second rank itself).
TWO_NODES = ["sweep.slurm.nodes=2", "trainer.num_nodes=2"]


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster: str) -> list[str]:
    """The nodes of the default partition; skips unless there are at least 2 (`up.sh --nodes 2`)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-p", slurm_cluster, "-o", "%N"], capture_output=True, text=True,
                         check=True).stdout
    nodes = sorted(set(out.split()))
    if len(nodes) < 2:
        pytest.skip(f"the running SLURM has {len(nodes)} node(s) in '{slurm_cluster}', these tests need 2: stop it "
                    "(slurm/local-cluster/down.sh) so that the session starts `up.sh --nodes 2`")
    return nodes


def submit_two_node_point(out: Path) -> tuple[Path, str]:
    """Point 0 of the debug grid as one 2-node x 1-task array job: its run dir and `<array job>_0`."""
    assert main(["sweep", DEBUG_SPEC, *FAST, ONE_POINT, *TWO_NODES, "--backend", "slurm", "--out", str(out)]) == 0
    [point] = load_sweep(out).points
    return out / point.run_dir, f"{launcher.read_submissions(out)[0]['job_id']}_0"


@pytest.fixture(scope="module")
def two_node_run(two_nodes: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(2 nodes x 1 task through SLURM, 1 node x 2 processes here): run dirs of the same point, both done."""
    root = tmp_path_factory.mktemp("two_nodes")
    slurm_run, _ = submit_two_node_point(root / "slurm")
    # Meanwhile: the job holds both nodes, but they and this run share the host's cores either way.
    local_out = root / "local"
    assert main(["sweep", DEBUG_SPEC, *FAST, ONE_POINT, "trainer.devices=2", "--backend", "local",
                 "--out", str(local_out)]) == 0
    wait_all_done(root / "slurm")
    [local_point] = load_sweep(local_out).points
    return slurm_run, local_out / local_point.run_dir


def test_two_nodes_by_one_task_equal_one_node_by_two_processes(two_nodes: list[str],
                                                                two_node_run: tuple[Path, Path]) -> None:
    slurm_run, local_run = two_node_run
    meta = json.loads((slurm_run / "meta.json").read_text())
    assert (meta["num_nodes"], meta["devices"]) == (2, 1)
    # Two tasks on two nodes with --ntasks-per-node=1: one rank on each slurmd.
    assert (meta["slurm"]["SLURM_NNODES"], meta["slurm"]["SLURM_NTASKS"]) == ("2", "2"), meta["slurm"]
    assert meta["slurm"]["SLURM_NODELIST"] in ("n[1-2]", ",".join(two_nodes[:2])), meta["slurm"]
    local_meta = json.loads((local_run / "meta.json").read_text())
    assert (local_meta["num_nodes"], local_meta["devices"], local_meta["slurm"]) == (1, 2, {})
    assert "MEMBER: 2/2" in (slurm_run / "console.log").read_text()
    # Exact, not approximate: the same two ranks (same seeds, same episodes per rank, one thread each) compute
    # the same floats, and gloo's all-reduce of two values is one addition, which is commutative. Only how the
    # processes started (srun on two slurmd vs Lightning's launcher) and where MASTER_ADDR points differ.
    rows = metric_rows(slurm_run)
    assert [r["step"] for r in rows if r["split"] == "val"] == [0, STEPS]
    assert rows == metric_rows(local_run)
    assert json.loads((slurm_run / "DONE").read_text())["val"] == json.loads((local_run / "DONE").read_text())["val"]


def test_usr1_preempts_the_two_node_job_which_requeues_and_matches_the_uninterrupted_run(
        two_node_run: tuple[Path, Path], tmp_path: Path) -> None:
    reference, _ = two_node_run
    out = tmp_path / "requeue"
    run_dir, task = submit_two_node_point(out)
    assert run_dir.name == reference.name  # the same config, run without interruption

    # Signal once the trainer logs its first train row (both ranks' handlers are installed), well before the end.
    wait_for("the first train row", lambda: any(r["split"] == "train" for r in _rows(run_dir)), poll=0.05)
    signal = subprocess.run(["scancel", "--batch", "--signal=USR1", task], capture_output=True, text=True)
    assert signal.returncode == 0, signal.stderr
    wait_for("the task to be requeued", lambda: states(out) == ["requeued"], timeout=120, poll=0.1)
    wait_all_done(out)

    console = (run_dir / "console.log").read_text()
    assert "preempted at step" in console and "requeued" in console
    preempted_at = int(console.split("preempted at step ")[1].split(":")[0])
    assert 10 <= preempted_at < STEPS
    assert f"resuming from step {preempted_at}" in console
    meta = json.loads((run_dir / "meta.json").read_text())
    assert [s["step"] for s in meta["starts"]] == [0, preempted_at]
    assert meta["slurm"]["SLURM_RESTART_COUNT"] == "1" and meta["slurm"]["SLURM_NNODES"] == "2"

    rows = metric_rows(run_dir)
    keys = [(r["step"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys)), "a step was logged twice after the requeue"
    assert rows == metric_rows(reference)
    assert json.loads((run_dir / "DONE").read_text())["val"] == json.loads((reference / "DONE").read_text())["val"]
