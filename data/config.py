"""The `data.*` config section: where the training episodes come from (DESIGN §5).

It lives in data/ so that the stream and the datamodule take it typed; train/config.py puts it in the run
config. `validate` is the one check of every data.* key (the run config and `EpisodeStream` both call it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from emformer.errors import ConfigError

SOURCES = ("fresh", "pool", "shards")


HELD_OUT_SEEDS = 1_000_000_000
"""Seeds of training episodes (data.seed, `emformer generate --seed`) lie below this; the eval and test sets
draw theirs at or above it (`held_out_seeds`), so no held-out episode can be a training episode of any run."""


def held_out_seeds(data_seed: int) -> tuple[int, int]:
    """(eval seed, test seed) of runs trained on `data_seed`: HELD_OUT_SEEDS + 2·data_seed (+ 1 for test).

    A pure function of the training seed, so every config of one seed shares its eval episodes (contrasts
    between configs stay paired) while two seeds never share any: the map is one-to-one, the eval seeds are
    even and the test seeds odd offsets, and all of them lie above every training seed."""
    if not 0 <= int(data_seed) < HELD_OUT_SEEDS:
        raise ValueError(f"a training seed must be in [0, {HELD_OUT_SEEDS:_}), got {data_seed}")
    return HELD_OUT_SEEDS + 2 * int(data_seed), HELD_OUT_SEEDS + 2 * int(data_seed) + 1


@dataclass
class DataConfig:
    source: str = "fresh"
    """fresh: new episodes every step (N = ∞) | pool: a finite pool of pool_size episodes | shards: read shards_dir"""
    pool_size: int = 0
    """N, the number of distinct pre-training episodes when source=pool"""
    shards_dir: Optional[str] = None
    """directory written by `emformer generate` when source=shards"""
    seed: int = 0
    """seed of the training episodes, below HELD_OUT_SEEDS (the eval and test sets derive theirs from it)"""
    batch_size: int = 64
    """episodes per step per rank"""
    num_workers: int = 0
    """dataloader worker processes per rank"""
    buckets: int = 0
    """0: off. B >= 2 (source=fresh, a ranged n): task.n..task.n_max is cut into B geometric length buckets;
    each batch draws all its episodes' n from one bucket, chosen with the bucket's probability under the
    task's n distribution as a pure function of (seed, batch), and pads only to that bucket's largest n"""

    def validate(self, prefix: str = "data") -> "DataConfig":
        """Raise ConfigError naming the first bad key; return self so calls chain."""

        def need(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"{prefix}.{key}: expected {expected}, got {getattr(self, key)!r}")

        need(self.source in SOURCES, "source", f"one of {', '.join(SOURCES)}")
        need(self.source != "pool" or self.pool_size >= 1, "pool_size", f"an integer >= 1 when {prefix}.source=pool")
        need(self.source != "shards" or bool(self.shards_dir), "shards_dir",
             f"a directory when {prefix}.source=shards")
        need(0 <= self.seed < HELD_OUT_SEEDS, "seed", f"an integer in [0, {HELD_OUT_SEEDS:_})")
        need(self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(self.num_workers >= 0, "num_workers", "an integer >= 0")
        need(self.buckets == 0 or self.buckets >= 2, "buckets", "0 (off) or an integer >= 2")
        need(self.buckets == 0 or self.source == "fresh", "buckets",
             f"0 unless {prefix}.source=fresh (pool and shard episodes are drawn once, padded to task.n_max)")
        return self
