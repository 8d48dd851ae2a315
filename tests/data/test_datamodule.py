"""The DataModule's loader: set up for a GPU when the trainer's accelerator is one (mocked here), and holding
only the keys the training step reads."""
from __future__ import annotations

import warnings
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

from emformer.data.config import DataConfig
from emformer.data.datamodule import EpisodeDataModule
from emformer.data.tasks import TaskSpec

SPEC = TaskSpec(k=2, d=3, n=16)
KEYS = ("points", "mask", "init", "kmask", "labels")


def loader(accelerator: object, workers: int = 0, keys: tuple[str, ...] | None = KEYS):
    module = EpisodeDataModule(SPEC, DataConfig(batch_size=4, num_workers=workers), keys=keys)
    module.trainer = SimpleNamespace(global_step=0, global_rank=0, world_size=1, accelerator=accelerator)
    return module.train_dataloader()


def test_a_gpu_loader_pins_its_batches():
    gpu = mock.Mock(spec=CUDAAccelerator)
    with pytest.warns(UserWarning, match="data.num_workers is 0 on a GPU"):
        assert loader(gpu).pin_memory
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpu_loader = loader(gpu, workers=2)
    assert gpu_loader.pin_memory and gpu_loader.num_workers == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not loader(CPUAccelerator()).pin_memory  # nothing to pin for, and no hint on CPU


def test_the_loader_keeps_only_the_step_keys():
    batch = next(iter(loader(CPUAccelerator())))
    assert set(batch) == set(KEYS)
    everything = next(iter(loader(CPUAccelerator(), keys=None)))
    assert {"seed", "index", "separation", "n"} <= set(everything)
    for key in KEYS:
        assert torch.equal(batch[key], everything[key])


def test_the_loader_passes_data_buckets_to_its_stream():
    from emformer.data.stream import EpisodeStream

    ranged = TaskSpec(k=2, d=3, n=8, n_max=256)
    module = EpisodeDataModule(ranged, DataConfig(batch_size=4, buckets=4))
    module.trainer = SimpleNamespace(global_step=3, global_rank=1, world_size=2, accelerator=CPUAccelerator())
    got = next(iter(module.train_dataloader()))
    want = EpisodeStream(ranged, seed=0, batch_size=4, buckets=4, rank=1, world_size=2).batch(3)
    assert got["points"].shape == want["points"].shape and torch.equal(got["points"], want["points"])
