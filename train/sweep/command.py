"""`emformer sweep SPEC [key=value ...] [--backend local|slurm]`: make the sweep dir (spec.py), then run the
points that are neither done nor active, locally (local.py) or as a SLURM job array (slurm_backend.py)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

from emformer.slurm.launcher import array_expression
from emformer.train.sweep.local import run_local
from emformer.train.sweep.slurm_backend import submit_slurm
from emformer.train.sweep.spec import LocalOptions, Point, Sweep, SweepSpec, expand_points, load_spec, prepare_sweep
from emformer.train.sweep.status import points_to_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="sweep spec (configs/sweeps/NAME.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value for every point (trainer.max_steps=100), or "
                        "sweep.KEY=value for the spec (sweep.slurm.partition=gpu, sweep.seeds=[0,1])")
    parser.add_argument("--backend", choices=("local", "slurm"), default="local")
    parser.add_argument("--out", type=Path, default=None, help="sweep directory (default sweeps/<name>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the points (and, for slurm, the sbatch script) without running anything")
    parser.add_argument("--parallel", type=int, default=None, help="local: runs at once (default local.parallel)")
    parser.add_argument("--threads", type=int, default=None,
                        help="local: threads per run (default local.threads_per_run)")


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides)
    if args.parallel is not None:
        spec.local = LocalOptions.from_dict({**dataclasses.asdict(spec.local), "parallel": args.parallel}, "--parallel")
    if args.threads is not None:
        spec.local = LocalOptions.from_dict({**dataclasses.asdict(spec.local), "threads_per_run": args.threads},
                                            "--threads")
    if args.dry_run:
        points = expand_points(spec)
        sweep = Sweep(args.out or Path("sweeps") / spec.name, spec, points)
        print(format_points(points, spec, sweep.dir))
        if args.backend == "slurm":
            print()
            submit_slurm(sweep, points, dry_run=True)
        return 0

    sweep = prepare_sweep(spec, args.out)
    todo, skipped = points_to_run(sweep)
    for reason, ids in sorted(skipped.items()):
        print(f"skipping {len(ids)} point(s) already {reason}: {_ids(ids)}")
    if not todo:
        print(f"{sweep.dir}: nothing to run ({len(sweep.points)} points; `emformer status {sweep.dir}`)")
        return 0
    if args.backend == "slurm":
        job_id = submit_slurm(sweep, todo)
        print(f"submitted job {job_id}: {len(todo)} point(s) {_ids([p.id for p in todo])} of {sweep.dir} "
              f"(`emformer status {sweep.dir}`)")
        return 0
    failed = run_local(sweep, todo, parallel=spec.local.parallel, threads=spec.local.threads_per_run)
    return 1 if failed else 0


def _ids(ids: Sequence[int]) -> str:
    return array_expression(ids) if ids else "-"


def format_points(points: Sequence[Point], spec: SweepSpec, out: str | Path) -> str:
    keys = list(dict.fromkeys(k for p in points for k in p.overrides))
    header = ["id", *keys, "seed", "run dir"]
    rows = [[str(p.id), *(json.dumps(p.overrides.get(k, "")) if k in p.overrides else "" for k in keys),
             str(p.seed), f"{out}/{p.run_dir}"] for p in points]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [f"sweep {spec.name}: {len(points)} points (base {spec.base}, wandb group {spec.group})"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="emformer sweep")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
