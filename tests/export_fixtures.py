"""Run directories and exports shared by tests/train and tests/models (imported by their conftest.py files;
tests/ is on sys.path through tests/conftest.py).

- `make_fake_run(dir)`: a run directory in the format `emformer train` writes, holding a *randomly
  initialised* model (no training: instant). For the export format, the loaders and bad-input tests.
- `train_tiny_run(dir)`: a real 30-step debug run (`emformer train` in a subprocess, ~15 s on 2 cores),
  done once per session whichever test directory asks first (the second finds DONE and reuses it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_STEPS = 30
FAKE_STEP = 30
FAKE_VAL_ROW = {
    "step": FAKE_STEP, "split": "val", "loss": 0.31, "err": 0.101, "err_anchored": 0.12, "ari": 0.61,
    "train_loss": 0.3, "train_err": 0.1, "err_em": 0.081, "err_em_anchored": 0.09, "loss_em": 0.25,
    "err_lloyd": 0.09, "err_oracle": 0.071, "err_oracle_anchored": 0.071, "loss_oracle": 0.2,
}


def fake_run_config(overrides: tuple[str, ...] = ()) -> dict:
    from emformer.train.config import load_config, to_dict

    return to_dict(load_config(REPO / "configs" / "debug.yaml", ["wandb.mode=disabled", *overrides]))


def architecture_of(config: dict) -> "TransformerConfig":
    """The transformer config of a run config dict (as a checkpoint's hyper-parameters hold it)."""
    from emformer.models.transformer import TransformerConfig
    from emformer.train.config import to_run_config

    run = to_run_config(config)
    return TransformerConfig.from_task_and_model(run.task, run.model)


def make_fake_run(run_dir: Path, overrides: tuple[str, ...] = (), seed: int = 0) -> Path:
    """checkpoints/{best,last}.ckpt (Lightning layout: state_dict with prefix model., hyper_parameters.config,
    global_step), config.yaml, meta.json, metrics.jsonl with one val row."""
    import yaml

    from emformer.models.transformer import ClusterTransformer, TransformerConfig

    run_dir = Path(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    config = fake_run_config(overrides)
    torch.manual_seed(seed)
    model = ClusterTransformer(architecture_of(config))
    checkpoint = {
        "state_dict": {f"model.{key}": value for key, value in model.state_dict().items()},
        "hyper_parameters": {"config": config},
        "global_step": FAKE_STEP,
        "epoch": 0,
    }
    for name in ("best.ckpt", "last.ckpt"):
        torch.save(checkpoint, run_dir / "checkpoints" / name)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "meta.json").write_text(json.dumps({"git": {"commit": "0123abcd"}, "param_count": model.num_parameters()}))
    (run_dir / "metrics.jsonl").write_text(
        json.dumps({"step": 10, "split": "train", "loss": 0.5, "lr": 1e-3}) + "\n" + json.dumps(FAKE_VAL_ROW) + "\n")
    return run_dir


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    return env


def train_tiny_run(run_dir: Path, extra: tuple[str, ...] = (), timeout: float = 600) -> Path:
    """A real `emformer train` debug run of TINY_STEPS steps (val and checkpoint at the end)."""
    run_dir = Path(run_dir)
    if (run_dir / "DONE").is_file():
        return run_dir
    command = [sys.executable, "-m", "emformer", "train", str(REPO / "configs" / "debug.yaml"),
               f"trainer.max_steps={TINY_STEPS}", f"trainer.val_every={TINY_STEPS}", f"trainer.ckpt_every={TINY_STEPS}",
               "trainer.progress=false", "trainer.threads=1", "wandb.mode=disabled", *extra, "--run-dir", str(run_dir)]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 or not (run_dir / "DONE").is_file():
        raise RuntimeError(f"tiny training run failed (rc {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return run_dir


# ---- the fixtures themselves (re-exported by tests/train/conftest.py and tests/models/conftest.py)
@pytest.fixture(scope="session")
def fake_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("fake-run"))


@pytest.fixture(scope="session")
def fake_export(fake_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from emformer.train.export.command import export_run

    return export_run(fake_run, tmp_path_factory.mktemp("fake-export") / "model")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_run(tmp_path_factory.getbasetemp() / "tiny-run")


@pytest.fixture(scope="session")
def tiny_export(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run's last checkpoint (the step of its final val row) exported with ONNX, once per session."""
    from emformer.train.export.command import export_run

    out = tmp_path_factory.getbasetemp() / "tiny-export"
    if not (out / "config.json").is_file():
        export_run(tiny_run, out, onnx=True, which="last")
    return out
