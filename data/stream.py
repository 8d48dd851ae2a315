"""The training stream: whole batches of episodes, split by global rank and dataloader worker (DESIGN §5, §6).

`EpisodeStream` is one IterableDataset with three sources:

- `fresh`: new episodes every step (N = ∞). Batch g of rank r holds episodes (g*world + r)*B + b, b < B, of
  `seed`, so 2 ranks with batch B see exactly what 1 rank with batch 2B sees.
- `pool`: a finite pool of exactly N distinct episodes, sample_episodes(spec, seed, range(N)). Global position
  p = (g*world + r)*B + b is in epoch e = p // N and takes pool episode perm_e(p % N), perm_e a keyed bijection
  of range(N) fixed by (seed, e) (data/permutation.py: a batch costs the same at any N): every epoch visits
  each pool episode exactly once, across all ranks.
- `shards`: episodes read from a directory written by `emformer generate` (manifest verified on open). The
  training (infinite) mode resamples them exactly like `pool` (N = episodes in the manifest), reading each
  episode by random access (wids), so it has the same guarantees. Not webdataset's resampled stream
  (`WebDataset(..., resampled=True)`): it draws shards with replacement per worker, so an epoch would not
  visit each episode once, batch g would depend on the worker count, and resuming would need the pipeline's
  state in the checkpoint; here batch g is a pure function of g, so the global step is the whole stream
  position. `finite=True` yields each episode exactly once through the indexed shard reader, shards split by
  rank, then by worker (shard j goes to rank j % world, then worker (j // world) % W), then stops.

Length buckets (`buckets` = B >= 2, fresh only, a ranged n): n_min..n_max is cut into B geometric ranges
(`length_buckets`); batch g takes bucket b with probability P(n in bucket b) under the task's n distribution,
b a pure function of (seed, g) (`keyed_uniform`, the same on every rank), and samples its episodes from the
task restricted to that bucket (n drawn as before, within the bucket: the conditional law), padded to the
bucket's largest n. Over batches n keeps the task's distribution; a batch's cost is that of its bucket.

Batches are yielded whole: use `DataLoader(stream, batch_size=None, num_workers=W)`. Worker w of W produces
batches g = start_step + w, start_step + w + W, ..., so the DataLoader's in-order round robin over workers
reproduces g = start_step, start_step + 1, ... whatever W is; `start_step` lets a resumed run continue
exactly where it stopped. Batch g is a pure function of (spec, source, seed, batch_size, N, rank, world, g).
A worker packs each batch into one buffer before handing it over (`pack_batch`): same values, less IPC.

This module stays light (torch + numpy, no lightning): `generate` and tests import it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from emformer import exact
from emformer.data.config import DataConfig
from emformer.data.episodes import EPISODE_KEYS, Batch, sample_episodes
from emformer.data.permutation import KeyedPermutation, keyed_uniform
from emformer.data.shards import ShardReader
from emformer.data.tasks import TaskSpec
from emformer.errors import ConfigError
from emformer.memory import keep_freed_memory

SPECTRAL_FRESH_WARNING = (
    "task.init=spectral with data.source=fresh: spectral init eigendecomposes an n x n affinity per episode "
    "(n={n}), far slower than the hundreds of episodes a second a training step consumes, so fresh episodes "
    "will starve training. Generate them once (`emformer generate ... --workers "
    "W`, then data.source=shards) or train on a finite pool (data.source=pool, generated once per process).")
# A pool is generated once per process and kept in memory when it fits in this budget; above it, pool
# episodes are regenerated from (seed, index) on demand (identical values, as episodes are pure functions).
POOL_CACHE_BYTES = int(os.environ.get("EMFORMER_POOL_CACHE_MB", "2048")) * 2**20
_POOL_CACHE: dict[tuple[str, int, int], Batch] = {}
BUCKET_TAG = 0x4255434B
"""keeps the per-batch bucket draw apart from the other keyed draws of (seed, batch)"""


def resolve_rank(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """(rank, world): the arguments if given, else torch.distributed if initialised, else env RANK/WORLD_SIZE."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            found = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    if not (world_size >= 1 and 0 <= rank < world_size):
        raise ConfigError(f"rank/world_size: expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


def resampled_indices(seed: int, size: int, start: int, count: int) -> torch.Tensor:
    """Episode indices at global positions start .. start+count-1 of the epoch-permuted stream over range(size).

    Only the `count` values needed are computed (data/permutation.py): the cost does not depend on `size`.
    """
    positions = np.arange(start, start + count, dtype=np.int64)
    epochs = positions // size
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs).tolist():
        sel = epochs == epoch
        out[sel] = KeyedPermutation(seed, epoch, size)(positions[sel] - epoch * size)
    return torch.from_numpy(out)


def episode_bytes(spec: TaskSpec) -> int:
    """Approximate memory of one padded episode (for the pool cache budget)."""
    k, n, d = spec.k_pad, spec.n_pad, spec.d_pad
    return 4 * (n * d + 3 * k * d + k + d) + 9 * n + k + 8 * 8


def pool_episodes(spec: TaskSpec, seed: int, size: int) -> Optional[Batch]:
    """The whole pool sample_episodes(spec, seed, range(size)), generated once per process; None if too big."""
    if size * episode_bytes(spec) > POOL_CACHE_BYTES:
        return None
    key = (json.dumps(spec.to_dict(), sort_keys=True), seed, size)
    if key not in _POOL_CACHE:
        chunks = [sample_episodes(spec, seed, range(lo, min(lo + 4096, size))) for lo in range(0, size, 4096)]
        _POOL_CACHE[key] = {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}
    return _POOL_CACHE[key]


def length_buckets(spec: TaskSpec, count: int) -> tuple[list[TaskSpec], torch.Tensor]:
    """The task restricted to each of (up to) `count` geometric ranges of n that cover task.n..task.n_max, and
    their cumulative probabilities [buckets] float64 under the task's n law (uniform or log-uniform integers:
    a log-uniform n lies in [a, b] with probability (ln(b + 1) − ln a) / (ln(n_max + 1) − ln n)). Geometric,
    so every bucket pads its episodes by at most the same factor."""
    lo, hi = spec.n, spec.n_pad
    if count < 2 or spec.n_max is None:
        raise ConfigError(f"data.buckets: expected 0 with a fixed n (task.n_max null), got {count}")
    cuts = sorted({round(lo * ((hi + 1) / lo) ** (b / count)) for b in range(count + 1)} | {lo, hi + 1})
    edges = torch.tensor(cuts, dtype=torch.float64)
    mass = (exact.log(edges[1:]) - exact.log(edges[:-1])) if spec.n_log else edges[1:] - edges[:-1]
    specs = [dataclasses.replace(spec, n=int(a), n_max=int(b) - 1) for a, b in zip(cuts[:-1], cuts[1:])]
    return specs, torch.cumsum(mass, 0) / mass.sum()


def bucket_of(cumulative: torch.Tensor, seed: int, step: int) -> int:
    """The bucket of batch `step`: a pure function of (seed, step), the same on every rank and worker."""
    u = torch.tensor([keyed_uniform(BUCKET_TAG, seed, step)], dtype=torch.float64)
    return min(int(torch.searchsorted(cumulative, u, right=True)), len(cumulative) - 1)


def pack_batch(batch: Batch) -> Batch:
    """The same tensors as views into one contiguous buffer (8-byte aligned), for the trip to the main process.

    A DataLoader worker hands each tensor over in its own shared-memory segment, and the *training* process
    pays for receiving every one of them (a batch has over a dozen tensors); one packed buffer is one segment,
    so the worker-to-trainer hand-over stays off the training step's critical path (BENCHMARKS.md, data
    section, has the DataLoader rows).
    """
    layout, offset = [], 0
    for name, value in batch.items():
        offset = -(-offset // 8) * 8
        layout.append((name, value, offset))
        offset += value.numel() * value.element_size()
    buffer = torch.empty(offset, dtype=torch.uint8)
    packed: Batch = {}
    for name, value, start in layout:
        view = buffer[start:start + value.numel() * value.element_size()].view(value.dtype).view(value.shape)
        view.copy_(value)
        packed[name] = view
    return packed


def select(batch: Batch, rows: torch.Tensor) -> Batch:
    """Rows of a batch (every tensor indexed along its first dimension)."""
    return {name: value.index_select(0, rows) for name, value in batch.items()}


class EpisodeStream(IterableDataset):
    """Whole batches of episodes forever (or once, for `finite` shards); see the module doc for the order."""

    def __init__(self, spec: TaskSpec, *, source: str = "fresh", seed: int, batch_size: int, pool_size: int = 0,
                 shards_dir: Optional[str | os.PathLike] = None, start_step: int = 0, rank: Optional[int] = None,
                 world_size: Optional[int] = None, finite: bool = False, verify: bool = True, buckets: int = 0) -> None:
        super().__init__()
        DataConfig(source=source, pool_size=pool_size, seed=seed, batch_size=batch_size, buckets=buckets,
                   shards_dir=None if shards_dir is None else os.fspath(shards_dir)).validate()
        if start_step < 0:
            raise ConfigError(f"start_step: expected an integer >= 0, got {start_step!r}")
        if finite and source != "shards":
            raise ConfigError(f"finite: only data.source=shards has a finite mode (use eval_set for {source})")
        self.spec = spec.validate()
        self.source, self.seed, self.batch_size = source, int(seed), int(batch_size)
        self.pool_size, self.start_step, self.finite = int(pool_size), int(start_step), finite
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.shards_dir = None if shards_dir is None else os.fspath(shards_dir)
        self._reader: Any = None
        self._buckets = length_buckets(self.spec, buckets) if buckets else None
        if source == "fresh" and self.spec.init == "spectral":
            warnings.warn(SPECTRAL_FRESH_WARNING.format(n=self.spec.n_pad), stacklevel=2)
        if source == "pool":
            # Built here, in the main process: forked DataLoader workers inherit it instead of each building it.
            pool_episodes(self.spec, self.seed, self.pool_size)
        if source == "shards":
            # Verified here, in the main process, so errors surface before workers start.
            self._reader = ShardReader(self.shards_dir, spec=self.spec, verify=verify)
            self.pool_size = self._reader.episodes

    # ------------------------------------------------------------------ one batch
    def batch(self, step: int) -> Batch:
        """Batch number `step` of this rank (infinite modes): a pure function of the stream's settings."""
        first = (step * self.world_size + self.rank) * self.batch_size
        if self.source == "fresh":
            spec = self.spec
            if self._buckets is not None:
                specs, cumulative = self._buckets
                spec = specs[bucket_of(cumulative, self.seed, step)]
            return sample_episodes(spec, self.seed, range(first, first + self.batch_size))
        indices = resampled_indices(self.seed, self.pool_size, first, self.batch_size)
        if self.source == "shards":
            return self._reader.read(indices)
        pool = pool_episodes(self.spec, self.seed, self.pool_size)
        if pool is None:
            return sample_episodes(self.spec, self.seed, indices)
        return select(pool, indices)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Batch]:
        keep_freed_memory()  # this process samples or decodes a batch after another: reuse their buffers
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        hand_over = pack_batch if info is not None else (lambda batch: batch)
        if self.finite:
            for batch in self._reader.iter_finite(self.rank, self.world_size, worker, workers, self.batch_size):
                yield hand_over(batch)
            return
        step = self.start_step + worker
        while True:
            yield hand_over(self.batch(step))
            step += workers


def eval_set(spec: TaskSpec, seed: int, episodes: int) -> Batch:
    """A fixed finite set: sample_episodes(spec, seed, range(episodes))."""
    if episodes < 1:
        raise ConfigError(f"eval.episodes: expected an integer >= 1, got {episodes!r}")
    return sample_episodes(spec, seed, range(episodes))


def pool_eval_set(spec: TaskSpec, data: DataConfig, episodes: int) -> Batch:
    """Up to `episodes` of the *training* episodes, to measure the train/test gap.

    fresh: episodes 0.. of data.seed (the first ones trained on) · pool: the first pool episodes ·
    shards: the first episodes of the manifest.
    """
    wanted = episodes
    if data.source == "pool":
        wanted = min(wanted, data.pool_size)
        pool = pool_episodes(spec, data.seed, data.pool_size)
        if pool is not None:
            return {name: value[:wanted].clone() for name, value in pool.items()}
    if data.source == "shards":
        reader = ShardReader(data.shards_dir, spec=spec)
        return reader.read(torch.arange(min(wanted, reader.episodes)))
    return sample_episodes(spec, data.seed, range(wanted))


__all__ = ["EpisodeStream", "eval_set", "pool_eval_set", "resolve_rank", "length_buckets", "bucket_of",
           "resampled_indices", "pool_episodes", "pack_batch", "EPISODE_KEYS"]
