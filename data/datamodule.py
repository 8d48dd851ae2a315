"""LightningDataModule around `EpisodeStream` (DESIGN §5).

Only a train dataloader: the LightningModule evaluates its fixed eval set (`stream.eval_set`) itself. The
stream is built when Lightning asks for it, with the trainer's global rank / world size and
`start_step = trainer.global_step`, so a run resumed from a checkpoint continues the exact batch sequence.
Train with `max_steps` (the stream is infinite; uneven finite streams would deadlock DDP, DESIGN §6).

On a GPU the loader pins its batches (so the step's `non_blocking` copies overlap the device's work) and
keeps only the keys the training step reads (`keys`), so the rest is neither pinned nor copied.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader

from emformer.data.config import DataConfig
from emformer.data.episodes import Batch
from emformer.data.stream import EpisodeStream
from emformer.data.tasks import TaskSpec


def select_keys(batch: Batch, keys: Sequence[str]) -> Batch:
    """The batch's tensors under `keys` (run in the loader's workers: module-level, so it pickles)."""
    return {key: batch[key] for key in keys}


class EpisodeDataModule(L.LightningDataModule):
    """Training batches for one run's task and data sections; `keys`: what the step reads (None: every key)."""

    def __init__(self, spec: TaskSpec, data: DataConfig, keys: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.spec = spec.validate()
        self.data = data.validate()
        self.keys = tuple(keys) if keys is not None else None

    def make_stream(self, start_step: int = 0, rank: int = 0, world_size: int = 1) -> EpisodeStream:
        data = self.data
        return EpisodeStream(
            self.spec, source=data.source, seed=data.seed, batch_size=data.batch_size, pool_size=data.pool_size,
            shards_dir=data.shards_dir, start_step=start_step, rank=rank, world_size=world_size,
            buckets=data.buckets,
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer is not None:
            start, rank, world = int(trainer.global_step), int(trainer.global_rank), int(trainer.world_size)
        else:  # used outside a Trainer (scripts, tests): torch.distributed / env decide
            start, rank, world = 0, None, None
        on_gpu = trainer is not None and isinstance(trainer.accelerator, CUDAAccelerator)
        stream = self.make_stream(start, rank, world)  # type: ignore[arg-type]
        workers = self.data.num_workers
        if on_gpu and workers == 0 and rank in (0, None):
            warnings.warn("data.num_workers is 0 on a GPU: episodes are drawn on the training thread, between "
                          "steps; set data.num_workers (e.g. 4) to draw them in loader processes", stacklevel=2)
        collate = (functools.partial(select_keys, keys=self.keys) if self.keys is not None
                   else torch.utils.data.default_convert)
        return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                          prefetch_factor=4 if workers > 0 else None, collate_fn=collate, pin_memory=on_gpu)
