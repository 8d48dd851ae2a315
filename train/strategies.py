"""Accelerator, precision and distributed strategy from the config (DESIGN §6).

- one process (devices * num_nodes == 1): Lightning's single-device strategy, so no process group starts;
- `ddp`: gloo on CPU, NCCL on GPU, any devices/nodes (one process too with `strategy.single_process_ddp`,
  which checks NCCL and the DDP wrapper on a single GPU);
- `deepspeed_zero{1,2,3}`: Lightning's DeepSpeedStrategy. Lightning refuses it on CPU; `CPUDeepSpeedStrategy`
  lifts that check (and skips DeepSpeed's slow compile of its shared-memory comm op on CPU), so ZeRO runs on
  CPU ranks over gloo, which is how the tests cover this path. The optimizer stays a plain torch AdamW.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from emformer.errors import DEEPSPEED_INSTALL, ConfigError
from emformer.train.config import RunConfig


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity set, as SLURM or taskset restrict it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_accelerator(name: str) -> str:
    """auto -> gpu when CUDA is there, else cpu; gpu without CUDA is a ConfigError."""
    name = "gpu" if name == "cuda" else name
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator: gpu requested but torch sees no CUDA device (use cpu or auto)")
    return name


def resolve_precision(precision: str, accelerator: str) -> str:
    """auto -> bf16-mixed on GPUs with native bf16, else 32. bf16-mixed runs on CPU too (Lightning's CPU
    autocast), so the GPU default's precision code is exercised without a GPU; 16-mixed is GPU only."""
    if precision == "auto":
        return "bf16-mixed" if accelerator == "gpu" and native_bf16() else "32"
    if accelerator == "cpu" and precision == "16-mixed":
        raise ConfigError("trainer.precision: 16-mixed is for GPUs (CPU autocast has no float16); use 32, "
                          "bf16-mixed or auto on CPU")
    return precision


def native_bf16() -> bool:
    """Whether the GPU computes in bf16 natively (compute capability 8.0 on: Ampere, Hopper, ...). Older GPUs
    (V100, T4) emulate it, slower than fp32, so `auto` must not pick it there; torch's is_bf16_supported()
    counts emulation unless told not to."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def check_devices(devices: int, accelerator: str) -> None:
    """devices > what this machine has is a ConfigError (per node: SLURM gives each node its own)."""
    if accelerator == "gpu":
        available = torch.cuda.device_count()
        what = "CUDA devices"
    else:
        available = os.cpu_count() or 1
        what = "CPU cores"
    if devices > available:
        raise ConfigError(f"trainer.devices: {devices} requested but this machine has {available} {what}")


def world_size(cfg: RunConfig) -> int:
    return int(cfg.trainer.devices) * int(cfg.trainer.num_nodes)


def build_strategy(cfg: RunConfig, accelerator: str) -> Any:
    """A Lightning strategy (object or 'auto') for cfg.strategy on `accelerator`."""
    name = str(cfg.strategy.name)
    if name.startswith("deepspeed"):
        return _deepspeed(cfg, accelerator, stage=int(name[-1]))
    if name == "auto" or (world_size(cfg) == 1 and not cfg.strategy.single_process_ddp):
        return "auto"  # single device: no process group for one process
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(process_group_backend="nccl" if accelerator == "gpu" else "gloo",
                       find_unused_parameters=bool(cfg.strategy.find_unused_parameters))


def _deepspeed(cfg: RunConfig, accelerator: str, stage: int) -> Any:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError(f"strategy.name={cfg.strategy.name}: deepspeed is not installed "
                          f"({DEEPSPEED_INSTALL})") from None
    strategy_cls = _cpu_deepspeed_class()
    offload = bool(cfg.strategy.offload_optimizer)
    strategy = strategy_cls(
        stage=stage,
        offload_optimizer=offload,
        micro_batch_size=int(cfg.data.batch_size),
        process_group_backend="nccl" if accelerator == "gpu" else "gloo",
    )
    if stage == 3:  # DeepSpeed keeps parameters under this size whole on every rank (Lightning has no argument)
        threshold = int(cfg.strategy.param_persistence_threshold)
        strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    return strategy


_CLASS: Any = None


def _cpu_deepspeed_class() -> Any:
    """Build the subclass lazily: importing lightning's deepspeed module costs time."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from lightning.pytorch.accelerators import CUDAAccelerator
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        """DeepSpeedStrategy that also runs on CPU ranks (gloo), for tests and CPU-only machines."""

        strategy_name = "emformer_deepspeed"

        def __init__(self, *args: Any, micro_batch_size: int = 1, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._micro_batch_size = micro_batch_size

        def setup_environment(self) -> None:
            if isinstance(self.accelerator, CUDAAccelerator):
                return super().setup_environment()
            _skip_shm_comm_op()
            # DeepSpeedStrategy's override only adds the CUDA check; run DDPStrategy's (process group etc.).
            DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:
            if isinstance(self.accelerator, CUDAAccelerator):
                return super().setup_distributed()
            # As DeepSpeedStrategy's, minus the check that device indices equal local ranks (CPU has none).
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
            if isinstance(self.accelerator, CUDAAccelerator):
                return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
            import argparse

            import deepspeed

            # As DeepSpeedStrategy's, but a CPU device has no index: DeepSpeed wants -1 ("not a GPU rank").
            engine, ds_optimizer, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=-1), config=self.config, model=model,
                model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
                lr_scheduler=lr_scheduler, dist_init_required=False,
            )
            return engine, ds_optimizer

        def _auto_select_batch_size(self) -> int:
            # Lightning reads the DataLoader's batch_sampler, which is None for our whole-batch stream.
            return self._micro_batch_size

    _CLASS = CPUDeepSpeedStrategy
    return _CLASS


def _skip_shm_comm_op() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory allreduce op at init (slow); gloo does without it."""
    import importlib

    try:
        # importlib, not `import ... as`: deepspeed.comm re-exports the name `torch` (the real torch module).
        ds_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    ds_torch.build_shm_op = lambda: None
