"""Sampler A/B: episodes per CPU-second of two samplers (or two allocator settings) in alternating windows.

On a shared machine the CPU-time rate of one core moves by up to 2x within seconds (its sibling's load,
the host's), so two figures taken minutes apart compare the machine, not the code. This script runs both
sides in one process, in alternating windows of `--batches` batches (the order flips every window), and
reports each side's median and best window and the median of the per-window ratios, which is what to quote.

    python benchmarks/bench_sampler_ab.py --against REV     # data/episodes.py of git revision REV vs now
    python benchmarks/bench_sampler_ab.py --malloc          # now, with and without keep_freed_memory

--against loads REV's data/episodes.py as a module beside the current one (it imports today's inits,
matching and standardization: what is compared is the sampler file). --malloc alternates glibc's own starting
thresholds (128 KiB mmap and trim, fixed) with emformer.memory's; glibc's adaptive default lies in between.
Task: k=3, d=8, n=256, batches of 64 consecutive indices (bench_data.py's), one torch thread.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from emformer.data import episodes  # noqa: E402
from emformer.data.tasks import TaskSpec  # noqa: E402
from emformer.memory import KEEP_BYTES, MMAP_BYTES, keep_freed_memory, set_malloc_thresholds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASK = {"k": 3, "d": 8, "n": 256}
BATCH = 64
GLIBC_START = 128 << 10


def sampler_at(revision: str) -> Callable:
    """sample_episodes of data/episodes.py as it was at `revision` (git show), loaded as its own module."""
    source = subprocess.run(["git", "show", f"{revision}:data/episodes.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"episodes_{revision}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"episodes_{revision}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.sample_episodes


def alternate(sides: dict[str, tuple[Callable, Callable[[], None]]], windows: int, batches: int) -> dict:
    """{side: [episodes per CPU-second of each window]}: sides = name -> (sample_episodes, set-up before a window)."""
    task = TaskSpec(**TASK)
    for sample, setup in sides.values():
        setup()
        sample(task, 0, range(BATCH))  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in sides}
    step, names = 1, list(sides)
    for window in range(windows):
        for name in (names if window % 2 == 0 else names[::-1]):
            sample, setup = sides[name]
            setup()
            start = time.process_time()
            for _ in range(batches):
                sample(task, 0, range(step * BATCH, (step + 1) * BATCH))
                step += 1
            rates[name].append(batches * BATCH / (time.process_time() - start))
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--against", metavar="REV", help="git revision whose data/episodes.py is side A")
    which.add_argument("--malloc", action="store_true", help="glibc's starting thresholds vs keep_freed_memory")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep = lambda: set_malloc_thresholds(MMAP_BYTES, KEEP_BYTES)  # noqa: E731
    if args.against:
        keep_freed_memory()
        sides = {args.against: (sampler_at(args.against), lambda: None),
                 "now": (episodes.sample_episodes, lambda: None)}
    else:
        sides = {"glibc start": (episodes.sample_episodes, lambda: set_malloc_thresholds(GLIBC_START, GLIBC_START)),
                 "keep_freed_memory": (episodes.sample_episodes, keep)}
    rates = alternate(sides, args.windows, args.batches)
    a, b = list(rates)
    ratios = sorted(y / x for x, y in zip(rates[a], rates[b]))
    load = os.getloadavg()[0]
    print(f"{args.windows} alternating windows of {args.batches} batches of {BATCH}, load {load:.1f}:")
    for name, values in rates.items():
        print(f"  {name}: median {statistics.median(values):,.0f}, best {max(values):,.0f} episodes per CPU-second")
    print(f"  {b} / {a}: median of per-window ratios {statistics.median(ratios):.2f} "
          f"(range {ratios[0]:.2f}-{ratios[-1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
