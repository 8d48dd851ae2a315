"""Strategies: DDP over 2 CPU processes (gloo) against 1 process with the doubled batch; DeepSpeed ZeRO-2 on 2
CPU ranks trains and resumes exactly; ZeRO-3 with every parameter sharded resumes exactly and exports; bf16-mixed
(one process, DDP, ZeRO-2) on CPU; and the accelerator / precision / devices checks."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from emformer.errors import ConfigError
from emformer.train import strategies
from emformer.train.config import load_run_config
from tests.train.trainrun import REPO, assert_same_rows, no_duplicate_steps, rows, train

DEBUG = REPO / "configs" / "debug.yaml"
# Short runs: 20 steps, val + checkpoint at 10 and 20.
SHORT = ("trainer.max_steps=20", "trainer.val_every=10", "trainer.ckpt_every=10", "trainer.log_every=5",
         "eval.episodes=64", "trainer.progress=false")


# ---------------------------------------------------------------------------------------------- unit
def test_single_process_uses_no_process_group():
    cfg = load_run_config(DEBUG)
    assert strategies.build_strategy(cfg, "cpu") == "auto"


def test_ddp_on_cpu_is_gloo():
    from lightning.pytorch.strategies import DDPStrategy

    strategy = strategies.build_strategy(load_run_config(DEBUG, ["trainer.devices=2"]), "cpu")
    assert isinstance(strategy, DDPStrategy) and strategy._process_group_backend == "gloo"


def test_single_process_ddp_wraps_one_process_in_ddp():
    """The 1-GPU DDP check of benchmarks/gpu_check.sh: a process group even for one process (NCCL on a GPU)."""
    from lightning.pytorch.strategies import DDPStrategy

    cfg = load_run_config(DEBUG, ["strategy.single_process_ddp=true"])
    for accelerator, backend in (("cpu", "gloo"), ("gpu", "nccl")):
        strategy = strategies.build_strategy(cfg, accelerator)
        assert isinstance(strategy, DDPStrategy) and strategy._process_group_backend == backend


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_strategy_builds_on_cpu(stage):
    pytest.importorskip("deepspeed")
    cfg = load_run_config(DEBUG, [f"strategy=deepspeed_zero{stage}", "trainer.devices=2", "data.batch_size=8"])
    strategy = strategies.build_strategy(cfg, "cpu")
    assert strategy.config["zero_optimization"]["stage"] == stage
    assert strategy._process_group_backend == "gloo" and strategy._auto_select_batch_size() == 8


def test_accelerator_precision_and_devices_checks():
    assert strategies.resolve_precision("auto", "cpu") == "32"
    with pytest.raises(ConfigError, match="trainer.precision: 16-mixed is for GPUs"):
        strategies.resolve_precision("16-mixed", "cpu")
    with pytest.raises(ConfigError, match="trainer.devices: 4096 requested but this machine has"):
        strategies.check_devices(4096, "cpu")
    strategies.check_devices(1, "cpu")
    if not torch.cuda.is_available():
        assert strategies.resolve_accelerator("auto") == "cpu"
        with pytest.raises(ConfigError, match="trainer.accelerator: gpu requested"):
            strategies.resolve_accelerator("gpu")


def test_each_rank_sees_different_episodes_and_together_the_doubled_batch():
    """What the DataModule hands rank 0 and rank 1 of 2 (batch B) is what 1 rank gets with batch 2B."""
    from emformer.data.datamodule import EpisodeDataModule

    def first_batches(world: int, rank: int, batch: int, start: int = 3) -> list[torch.Tensor]:
        cfg = load_run_config(DEBUG, [f"data.batch_size={batch}"])
        module = EpisodeDataModule(cfg.task, cfg.data)
        module.trainer = SimpleNamespace(global_step=start, global_rank=rank, world_size=world, accelerator=None)
        stream = iter(module.train_dataloader())
        return [next(stream)["index"] for _ in range(2)]

    rank0, rank1, single = first_batches(2, 0, 4), first_batches(2, 1, 4), first_batches(1, 0, 8)
    for a, b, both in zip(rank0, rank1, single):
        assert not set(a.tolist()) & set(b.tolist())
        assert torch.equal(torch.cat([a, b]), both)


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """2 CPU processes (gloo), 16 episodes each: the reference of the single-process and the ZeRO runs."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    return run_dir, train(run_dir, *SHORT, "trainer.devices=2", "strategy=ddp", "data.batch_size=16")


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_the_doubled_batch(ddp_run, tmp_path):
    two, result = ddp_run
    one = tmp_path / "single"
    train(one, *SHORT, "trainer.devices=1", "data.batch_size=32")
    assert "cpu x 2, strategy ddp" in result.stderr
    assert json.loads((two / "meta.json").read_text())["devices"] == 2
    # Gradients averaged over 2 x 16 episodes = the gradient of the mean over the same 32 episodes.
    assert_same_rows(rows(two), rows(one), rel=2e-4, abs_=2e-5)
    assert rows(two, "val")[-1]["loss"] < rows(two, "val")[0]["loss"]


def _zero_run(run_dir: Path, stage: int, *extra: str, **kwargs) -> object:
    return train(run_dir, *SHORT, f"strategy=deepspeed_zero{stage}", "trainer.devices=2", "data.batch_size=16",
                 *extra, **kwargs)


@pytest.mark.slow
def test_deepspeed_zero2_on_two_cpu_ranks_trains_and_resumes(ddp_run, tmp_path):
    """Killed after step 15 (checkpoint at 10), resumed: the same metrics as the uninterrupted DDP run (the
    same mathematics: plain AdamW on gradients averaged over the 2 ranks, optimizer state sharded)."""
    pytest.importorskip("deepspeed")
    reference, _ = ddp_run
    run_dir = tmp_path / "zero2"
    _zero_run(run_dir, 2, extra_env={"EMFORMER_CRASH_AT_STEP": "15"}, expect=1)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "latest").is_file()  # a DeepSpeed checkpoint directory
    assert not (run_dir / "DONE").exists()
    result = _zero_run(run_dir, 2)
    assert "resuming from step 10" in result.stderr and "strategy deepspeed_zero2" in result.stderr
    no_duplicate_steps(run_dir)
    assert (run_dir / "DONE").is_file()
    assert_same_rows(rows(run_dir), rows(reference), rel=2e-4, abs_=2e-5)


@pytest.mark.slow
def test_deepspeed_zero3_shards_every_parameter_resumes_and_exports(ddp_run, tmp_path):
    """With the persistence threshold at 0 ZeRO-3 shards every parameter (by default DeepSpeed keeps those
    under 100,000 elements whole, i.e. all of the debug model's): the checkpoint's module holds only empty
    placeholders. Killed after step 15 and resumed, it ends with the DDP run's metrics, and it exports."""
    pytest.importorskip("deepspeed")
    reference, _ = ddp_run
    run_dir = tmp_path / "zero3"
    sharded = "strategy.param_persistence_threshold=0"
    _zero_run(run_dir, 3, sharded, extra_env={"EMFORMER_CRASH_AT_STEP": "15"}, expect=1)
    states = run_dir / "checkpoints" / "last.ckpt" / "checkpoint" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    assert module and all(value.numel() == 0 for value in module.values())
    result = _zero_run(run_dir, 3, sharded)
    assert "resuming from step 10" in result.stderr and (run_dir / "DONE").is_file()
    no_duplicate_steps(run_dir)
    assert_same_rows(rows(run_dir), rows(reference), rel=2e-4, abs_=2e-5)
    out = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "emformer", "export", str(run_dir), "--out", str(out)], cwd=REPO,
                   check=True, capture_output=True, text=True, timeout=300)
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    assert sum(w.numel() for w in weights.values()) == json.loads((run_dir / "meta.json").read_text())["param_count"]


@pytest.mark.slow
def test_the_final_evaluation_of_a_sharded_model_trained_to_iterate_keeps_every_pass(tmp_path):
    """Under ZeRO-3 every parameter is a shard outside a forward: the per-pass evaluation runs through the
    model's forward on both ranks (a direct forward_passes call would see empty placeholders)."""
    pytest.importorskip("deepspeed")
    from emformer.train.rundir import read_episode_results

    run_dir = tmp_path / "zero3-passes"
    train(run_dir, "trainer.max_steps=4", "trainer.val_every=4", "trainer.log_every=4", "trainer.ckpt_every=4",
          "eval.episodes=16", "model.passes=2", "strategy=deepspeed_zero3", "trainer.devices=2",
          "data.batch_size=16", "strategy.param_persistence_threshold=0", "trainer.progress=false")
    episodes = read_episode_results(run_dir)
    assert episodes["err_pass"].shape == episodes["err_em_iter"].shape == (16, 2)
    assert (episodes["err_pass"][:, -1] == episodes["err_model"]).all()


# ---------------------------------------------------------------------------------------------- precision
def test_bf16_mixed_runs_on_cpu_and_auto_stays_fp32_there():
    assert strategies.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert strategies.resolve_precision("auto", "cpu") == "32"


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16-mixed"), ((8, 0), "bf16-mixed"),
                                                  ((7, 0), "32"), ((7, 5), "32")])
def test_auto_precision_takes_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, capability, expected):
    """An H100 (9.0) or A100 (8.0) gets bf16-mixed; a V100 (7.0) or T4 (7.5) only emulates bf16 (slower than
    fp32), though torch's is_bf16_supported() says True there unless told to leave emulation out."""
    def is_bf16_supported(including_emulation: bool = True) -> bool:  # torch's rule, on a mocked GPU
        return capability >= (8, 0) or including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert strategies.resolve_precision("auto", "gpu") == expected
    assert strategies.resolve_precision("32", "gpu") == "32"


def test_zero3_persistence_threshold_reaches_deepspeed():
    pytest.importorskip("deepspeed")
    for overrides, threshold in (((), 100_000), (("strategy.param_persistence_threshold=0",), 0)):
        cfg = load_run_config(DEBUG, ["strategy=deepspeed_zero3", "trainer.devices=2", *overrides])
        zero = strategies.build_strategy(cfg, "cpu").config["zero_optimization"]
        assert zero["stage3_param_persistence_threshold"] == threshold


def _finite_rows(run_dir: Path) -> None:
    values = [v for r in rows(run_dir) for k, v in r.items() if isinstance(v, float)]
    assert values and all(math.isfinite(v) for v in values)


@pytest.mark.slow
def test_bf16_mixed_trains_on_cpu_under_ddp(tmp_path):
    """The GPU default precision on CPU (autocast bf16) under DDP over 2 processes (gloo); one process runs it
    in gpu_check's --cpu --bf16 test (tests/test_benchmarks.py)."""
    run_dir = tmp_path / "bf16"
    result = train(run_dir, *SHORT, "trainer.max_steps=10", "trainer.precision=bf16-mixed", "trainer.devices=2",
                   "data.batch_size=16")
    assert "precision bf16-mixed" in result.stderr and (run_dir / "DONE").is_file()
    assert [r["step"] for r in rows(run_dir, "val")] == [0, 10]
    _finite_rows(run_dir)


@pytest.mark.slow
def test_deepspeed_zero2_bf16_evaluates_and_trains_on_cpu(tmp_path):
    """DeepSpeed casts the weights to bf16 and adds no autocast: the evaluation must cast its episodes as the
    training step's batches are cast (it stopped at the step-0 evaluation with a dtype mismatch)."""
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "zero2-bf16"
    result = _zero_run(run_dir, 2, "trainer.max_steps=10", "trainer.precision=bf16-mixed")
    assert "strategy deepspeed_zero2, precision bf16-mixed" in result.stderr and (run_dir / "DONE").is_file()
    val = rows(run_dir, "val")
    assert [r["step"] for r in val] == [0, 10] and val[-1]["loss"] < val[0]["loss"]
    _finite_rows(run_dir)
