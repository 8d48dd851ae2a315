"""The sbatch script and the SLURM plumbing that needs no cluster: rendering (golden), array expressions,
the slurm section's checks, the GPU example's world shape, dry runs, and a missing sbatch."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from emformer.errors import ConfigError
from emformer.slurm import launcher
from emformer.slurm.launcher import SlurmError, SlurmOptions, array_expression, parse_array_ids, render_script
from emformer.train.cli import main
from emformer.train.sweep.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
GPU_EXAMPLE = REPO / "configs" / "sweeps" / "gpu_cluster_example.yaml"
DEBUG_SPEC = REPO / "configs" / "sweeps" / "debug.yaml"
GOLDEN = Path(__file__).with_name("golden") / "gpu_2x4.sbatch"


def render_gpu_example() -> str:
    """The example's slurm section (2 nodes x 4 GPUs) for 6 points, 4 of them submitted; fixed paths."""
    options = load_spec(GPU_EXAMPLE).slurm
    return render_script(
        options, sweep_name="depth_heads_n", sweep_dir=Path("/scratch/sweeps/dhn"),
        run_dirs=[(i, f"runs/reference-{i:08x}") for i in range(6)], ids=[0, 1, 2, 5],
        workdir=Path("/home/me/emformer"), devices=4, script_name="/scratch/sweeps/dhn/slurm/sweep-001.sbatch",
        python="/home/me/emformer/.venv/bin/python")


def test_two_node_four_gpu_script_matches_golden() -> None:
    script = render_gpu_example()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text(), "rendered script changed; UPDATE_GOLDEN=1 rewrites the golden file"


def test_two_node_four_gpu_script_asks_for_the_right_allocation() -> None:
    script = render_gpu_example()
    sbatch = re.findall(r"^#SBATCH (\S+)$", script, re.M)
    for line in ("--partition=gpu", "--account=my-lab", "--qos=normal", "--time=12:00:00", "--nodes=2",
                 "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--mem=256G",
                 "--constraint=a100|h100", "--array=0-2,5%4", "--requeue", "--signal=B:USR1@300",
                 "--open-mode=append", "--exclusive", "--mail-type=FAIL", "--chdir=/home/me/emformer"):
        assert line in sbatch, line
    # One srun task per GPU, on every node; Lightning's SLURM environment reads the rank layout from it.
    srun = re.search(r"^srun (.*)$", script, re.M)
    assert srun and "--ntasks-per-node=4" in srun.group(1) and "--cpus-per-task=8" in srun.group(1)
    assert "/home/me/emformer/.venv/bin/python -m emformer train" in script
    assert script.index("module load cuda/12.4") < script.index("srun ")
    # Only the batch shell gets USR1 (B:); its trap forwards it to srun, which owns nothing else.
    assert "trap forward_usr1 USR1" in script and 'kill -USR1 "$SRUN_PID"' in script
    for point in (0, 1, 2, 5):  # every point maps to its run dir, also those not in this array
        assert f"RUN_DIRS[{point}]=runs/reference-{point:08x}" in script


def test_rendered_script_is_valid_bash(tmp_path: Path) -> None:
    path = tmp_path / "s.sbatch"
    path.write_text(render_gpu_example())
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_gpu_example_runs_every_point_on_two_nodes_of_four_gpus() -> None:
    from emformer.train.sweep.slurm_backend import world_shape
    from emformer.train.sweep.spec import Sweep, expand_points

    spec = load_spec(GPU_EXAMPLE)
    points = expand_points(spec)
    assert len(points) == (3 * 2 * 3 + 1) * 2
    for point in points:
        trainer = point.config.trainer
        assert (trainer.accelerator, trainer.devices, trainer.num_nodes) == ("gpu", 4, 2)
        assert point.config.wandb.group == "depth_heads_n"
        assert point.config.data.num_workers > 0  # a GPU's loader draws in worker processes
    assert world_shape(Sweep(Path("unused"), spec, points)) == 4
    assert {p.config.data.source for p in points} == {"pool", "fresh"}


def test_dry_run_prints_points_and_script_without_slurm(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch, no sinfo: a dry run needs neither
    out = tmp_path / "dry"
    assert main(["sweep", str(GPU_EXAMPLE), "--backend", "slurm", "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sweep depth_heads_n: 38 points" in printed
    assert "#SBATCH --array=0-37%4" in printed and f"#SBATCH --output={out.resolve()}/slurm/logs/%A_%a.out" in printed
    assert not out.exists()  # nothing written


def test_missing_sbatch_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "s"
    assert main(["sweep", str(DEBUG_SPEC), "--backend", "slurm", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'sbatch' not found on PATH" in err and "slurm/local-cluster/up.sh" in err
    assert launcher.read_submissions(out) == []
    with pytest.raises(SlurmError, match="'sinfo' not found"):
        launcher.check_partition("gpu")


def test_array_expressions_round_trip() -> None:
    assert array_expression([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert array_expression([3], 4) == "3%4"
    for ids in ([0], [0, 1, 2, 3], [1, 3, 5], [0, 2, 3, 4, 9, 10]):
        assert parse_array_ids(array_expression(ids, 2)) == ids
    assert parse_array_ids("0-6:2%3") == [0, 2, 4, 6]
    with pytest.raises(ValueError):
        array_expression([])


@pytest.mark.parametrize("values, key", [
    ({"nodes": 0}, "slurm.nodes"),
    ({"time": "12h"}, "slurm.time"),
    ({"gpus_per_node": -1}, "slurm.gpus_per_node"),
    ({"extra_sbatch": "--exclusive"}, "slurm.extra_sbatch"),
    ({"job_name": "bash"}, "slurm.job_name"),
    ({"partiton": "gpu"}, "partiton"),
])
def test_bad_slurm_section_names_the_key(values: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        SlurmOptions.from_dict(values, "spec.yaml")


def test_extra_sbatch_lines_may_carry_the_prefix() -> None:
    options = SlurmOptions.from_dict({"extra_sbatch": ["#SBATCH --exclusive", "--gres=gpu:2"]}, "spec")
    script = render_script(options, sweep_name="x", sweep_dir=Path("/s"), run_dirs=[(0, "runs/a")], ids=[0],
                           workdir=Path("/w"), python="python3")
    assert "#SBATCH --exclusive\n#SBATCH --gres=gpu:2\n" in script
    assert "#SBATCH --partition" not in script  # none given: the cluster's default
