"""`emformer generate`: write a config's episodes to webdataset shards with a manifest (data/shards.py)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from emformer.data.config import HELD_OUT_SEEDS
from emformer.data.shards import MANIFEST, write_shards
from emformer.errors import ConfigError
from emformer.train.cli import add_config_arguments
from emformer.train.config import load_run_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="output directory (created; reruns complete it)")
    parser.add_argument("--episodes", type=int, required=True, help="number of episodes N (indices 0..N-1)")
    parser.add_argument("--shard-size", type=int, default=1000, help="episodes per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=1, help="parallel writer processes (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="episode seed (default: the config's data.seed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    config = load_run_config(args.config, args.overrides)
    seed = config.data.seed if args.seed is None else args.seed
    if not 0 <= seed < HELD_OUT_SEEDS:
        raise ConfigError(f"--seed: expected a training seed in [0, {HELD_OUT_SEEDS:_}) (the seeds at or above it "
                          f"are the eval and test sets'), got {seed}")
    started = time.perf_counter()
    manifest = write_shards(config.task, seed, args.out, args.episodes, args.shard_size, args.workers,
                            progress=not args.no_progress)
    seconds = time.perf_counter() - started
    total = sum(r["bytes"] for r in manifest["shards"])
    print(f"{args.out}: {manifest['episodes']} episodes of seed {seed} in {len(manifest['shards'])} shard(s), "
          f"{total / 2**20:.1f} MiB, manifest {Path(args.out) / MANIFEST} ({seconds:.1f} s)")
    return 0
