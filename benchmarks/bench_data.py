"""Data throughput: is the episode stream ever the bottleneck of training? (issue 3, "Benchmark")

Measures episodes/s of the task k=3, d=8, n=256 in batches of 64:
  - generated on the fly (in-process, and by a DataLoader with 1 and 2 worker processes),
  - written to shards by `emformer generate` (1 and 2 writer processes),
  - read back from shards (random-access resampled training stream, and the finite sequential mode),
and the ratio to what one reference training step consumes (64 episodes per 0.155 s = 413 episodes/s;
target >= 20x). On a shared machine wall-clock rates vary with the load, so single-process rows also report
the rate per CPU-second (process time), which is what one free core would deliver.

    python benchmarks/bench_data.py [--batches 40] [--json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from emformer.data.shards import write_shards  # noqa: E402
from emformer.data.stream import EpisodeStream  # noqa: E402
from emformer.data.tasks import TaskSpec  # noqa: E402


def timed(run: Callable[[], int]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, episodes) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    episodes = run()
    return time.perf_counter() - wall, time.process_time() - cpu, episodes


def from_loader(stream: EpisodeStream, workers: int, batches: int) -> Callable[[], int]:
    def run() -> int:
        loader = iter(DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None))
        try:
            next(loader)  # worker start-up is not throughput
            start = time.perf_counter()
            count = sum(len(b["index"]) for b in itertools.islice(loader, batches))
            run.steady = time.perf_counter() - start  # type: ignore[attr-defined]
            return count
        finally:
            getattr(loader, "_shutdown_workers", lambda: None)()
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40, help="batches per measurement")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--step-seconds", type=float, default=0.155, help="reference training step time")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = TaskSpec(k=args.k, d=args.d, n=args.n)
    batch = args.batch_size
    consumed = batch / args.step_seconds
    rows: list[dict] = []

    def add(name: str, wall: float, cpu: float | None, episodes: int) -> None:
        rate = episodes / wall
        row = {"name": name, "episodes": episodes, "eps_per_s": rate, "x_step": rate / consumed}
        if cpu:
            row["eps_per_cpu_s"] = episodes / cpu
            row["x_step_per_cpu_s"] = episodes / cpu / consumed
        rows.append(row)

    fresh = EpisodeStream(spec, seed=0, batch_size=batch, rank=0, world_size=1)
    fresh.batch(0)  # warm-up (imports, allocator)
    wall, cpu, n = timed(lambda: sum(len(fresh.batch(g)["index"]) for g in range(args.batches)))
    add("fresh, in-process (1 core)", wall, cpu, n)
    for workers in (1, 2):
        run = from_loader(fresh, workers, args.batches)
        timed(run)
        add(f"fresh, DataLoader {workers} worker(s)", run.steady, None, args.batches * batch)  # type: ignore[attr-defined]

    workdir = tempfile.mkdtemp(prefix="bench-data-")
    try:
        episodes = args.batches * batch
        for workers in (1, 2):
            out = os.path.join(workdir, f"w{workers}")
            wall, cpu, _ = timed(lambda: write_shards(spec, 0, out, episodes, max(episodes // 8, 1), workers,
                                                      progress=False)["episodes"])
            add(f"write shards, {workers} process(es)", wall, cpu if workers == 1 else None, episodes)
        shards = os.path.join(workdir, "w1")
        size = sum(os.path.getsize(os.path.join(shards, f)) for f in os.listdir(shards) if f.endswith(".tar"))
        reader = EpisodeStream(spec, source="shards", shards_dir=shards, seed=0, batch_size=batch)
        reader.batch(0)
        wall, cpu, n = timed(lambda: sum(len(reader.batch(g)["index"]) for g in range(args.batches)))
        add("read shards, resampled, in-process", wall, cpu, n)
        run = from_loader(reader, 2, args.batches - 1)
        timed(run)
        add("read shards, resampled, DataLoader 2 workers", run.steady, None, (args.batches - 1) * batch)  # type: ignore[attr-defined]
        finite = EpisodeStream(spec, source="shards", shards_dir=shards, seed=0, batch_size=batch, finite=True)
        wall, cpu, n = timed(lambda: sum(len(b["index"]) for b in finite))
        add("read shards, finite sequential, in-process", wall, cpu, n)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result = {"task": {"k": spec.k, "d": spec.d, "n": spec.n}, "batch_size": batch,
              "step_consumes_eps_per_s": consumed, "target_x": 20, "shard_bytes_per_episode": size / episodes,
              "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"task k={spec.k} d={spec.d} n={spec.n}, batch {batch}; one training step consumes {consumed:.0f} "
          f"episodes/s (target >= 20x); {size / episodes / 1024:.1f} KiB per episode on disk; "
          f"load average {result['load_avg_1m']:.1f} on {result['cpus']} CPUs")
    print(f"{'measurement':<46} {'eps/s':>9} {'x step':>7} {'eps/CPU-s':>10} {'x step':>7}")
    for row in rows:
        per_cpu = (f"{row['eps_per_cpu_s']:>10.0f} {row['x_step_per_cpu_s']:>7.1f}"
                   if "eps_per_cpu_s" in row else f"{'':>10} {'':>7}")
        print(f"{row['name']:<46} {row['eps_per_s']:>9.0f} {row['x_step']:>7.1f} {per_cpu}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
