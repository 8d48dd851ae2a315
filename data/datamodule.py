"""LightningDataModule around `EpisodeStream` (DESIGN §5).

Only a train dataloader: the LightningModule evaluates its fixed eval set (`stream.eval_set`) itself. The
stream is built when Lightning asks for it, with the trainer's global rank / world size and
`start_step = trainer.global_step`, so a run resumed from a checkpoint continues the exact batch sequence.
Train with `max_steps` (the stream is infinite; uneven finite streams would deadlock DDP, DESIGN §6).
"""
from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from emformer.data.config import DataConfig
from emformer.data.stream import EpisodeStream
from emformer.data.tasks import TaskSpec


class EpisodeDataModule(L.LightningDataModule):
    """Training batches for one run's task and data sections."""

    def __init__(self, spec: TaskSpec, data: DataConfig) -> None:
        super().__init__()
        self.spec = spec.validate()
        self.data = data.validate()

    def make_stream(self, start_step: int = 0, rank: int = 0, world_size: int = 1) -> EpisodeStream:
        data = self.data
        return EpisodeStream(
            self.spec, source=data.source, seed=data.seed, batch_size=data.batch_size, pool_size=data.pool_size,
            shards_dir=data.shards_dir, start_step=start_step, rank=rank, world_size=world_size,
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer is not None:
            start, rank, world = int(trainer.global_step), int(trainer.global_rank), int(trainer.world_size)
        else:  # used outside a Trainer (scripts, tests): torch.distributed / env decide
            start, rank, world = 0, None, None
        stream = self.make_stream(start, rank, world)  # type: ignore[arg-type]
        workers = self.data.num_workers
        return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                          prefetch_factor=4 if workers > 0 else None)
