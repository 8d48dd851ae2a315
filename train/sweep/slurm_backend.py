"""The SLURM backend of `emformer sweep`: one job array per submission, rendered by emformer.slurm.launcher.

Every point of one array must have the same world shape (devices x nodes) as the spec's `slurm:` section.
The scripts, submissions.json and the job logs live under <sweep dir>/slurm/ (written by the launcher).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from emformer.atomic import atomic_write_text
from emformer.errors import ConfigError
from emformer.slurm import launcher
from emformer.train import rundir
from emformer.train.sweep.spec import Point, Sweep


def submit_slurm(sweep: Sweep, points: Sequence[Point], dry_run: bool = False, workdir: Path | None = None) -> Optional[str]:
    """Render the array script for `points` and submit it (or print it for --dry-run); the job id."""
    options = sweep.spec.slurm
    devices = world_shape(sweep)
    sweep_dir = sweep.dir.resolve()
    records = launcher.read_submissions(sweep_dir)
    script_name = f"sweep-{len(records) + 1:03d}.sbatch"
    workdir = (workdir or Path.cwd()).resolve()
    script = launcher.render_script(
        options, sweep_name=sweep.spec.name, sweep_dir=sweep_dir,
        run_dirs=[(p.id, p.run_dir) for p in sweep.points], ids=[p.id for p in points],
        workdir=workdir, devices=devices, script_name=f"{sweep_dir}/slurm/{script_name}")
    if dry_run:
        print(script)
        return None
    launcher.check_partition(options.partition)
    (sweep_dir / "slurm" / "logs").mkdir(parents=True, exist_ok=True)
    script_path = sweep_dir / "slurm" / script_name
    atomic_write_text(script_path, script)
    try:
        job_id = launcher.submit(script_path)
    except launcher.SlurmError as exc:  # nothing recorded: the points stay "not submitted"
        raise launcher.SlurmError(f"{exc}; nothing was submitted: `emformer status {sweep.dir}` lists the "
                                  f"{len(points)} point(s) as not submitted, and the same `emformer sweep` command "
                                  "submits them once the cause is fixed") from None
    launcher.record_submission(sweep_dir, {
        "job_id": job_id,
        "array": launcher.array_expression([p.id for p in points], min(options.array_parallel, len(points))),
        "points": {str(p.id): p.run_dir for p in points},
        "script": f"slurm/{script_name}",
        "submitted_at": time.time(),
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": ["sbatch", "--parsable", str(script_path)],
        "workdir": str(workdir),
    })
    return job_id


def world_shape(sweep: Sweep) -> int:
    """One array job has one shape: every point must want the same devices and nodes, matching `slurm:`.
    Returns trainer.devices (the tasks per node)."""
    options = sweep.spec.slurm
    shapes = set()
    for point in sweep.points:
        if point.config is not None:
            trainer = OmegaConf.to_container(point.config.trainer)
        else:
            trainer = rundir.read_config(sweep.run_dir(point)).get("trainer", {})
        shapes.add((int(trainer.get("devices", 1)), int(trainer.get("num_nodes", 1))))
    if len(shapes) != 1:
        raise ConfigError(f"{sweep.spec.source}: points differ in (trainer.devices, trainer.num_nodes) "
                          f"{sorted(shapes)}; one job array needs one shape: split the sweep")
    devices, num_nodes = shapes.pop()
    if num_nodes != options.nodes or options.tasks_per_node(devices) != devices:
        raise ConfigError(f"{sweep.spec.source}: trainer.devices={devices}, trainer.num_nodes={num_nodes} do not "
                          f"match the slurm section (nodes={options.nodes}, {options.tasks_per_node(devices)} tasks "
                          "per node): set them in overrides, or set slurm.gpus_per_node")
    return devices
