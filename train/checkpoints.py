"""Checkpoint files of a run: where they live, atomic saving, and checks before resuming.

`checkpoints/last.ckpt` and `checkpoints/best.ckpt` are Lightning checkpoints (a file; a directory under
DeepSpeed). Saving goes to a temporary name first and is renamed into place, so a crash mid-save leaves the
previous checkpoint intact. Before resuming, `check_resumable` loads the file with weights_only=True and
compares every tensor shape with the model about to be trained, so a mismatch fails with the file and the
tensor named instead of deep inside Lightning.
"""
from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from emformer.errors import CheckpointError

LAST = "last.ckpt"
BEST = "best.ckpt"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def resume_path(run_dir: Path) -> Optional[Path]:
    """checkpoints/last.ckpt if there is one (file, or DeepSpeed directory)."""
    path = checkpoint_dir(run_dir) / LAST
    if path.exists():
        return path
    # A crash inside the directory rename dance of save_atomic leaves the previous one here.
    old = path.with_name(f".{LAST}.old")
    if old.is_dir():
        try:
            os.replace(old, path)
        except FileNotFoundError:  # another rank of this run got there first
            pass
        return path
    return None


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """torch.load(weights_only=True) with clear errors for missing / corrupt / foreign files."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({first}); "
                              "delete it to start over, or restore it from a copy") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (top level is {type(checkpoint).__name__})")
    return checkpoint


def _deepspeed_client_state(path: Path) -> dict[str, Any]:
    """The Lightning part of a DeepSpeed checkpoint directory (module states file of model-parallel rank 0)."""
    tag_file = path / "latest"
    tag = tag_file.read_text().strip() if tag_file.is_file() else "checkpoint"
    states = path / tag / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise CheckpointError(f"{path}: not a complete DeepSpeed checkpoint (missing {states.relative_to(path)})")
    try:
        # DeepSpeed pickles its own objects in here; weights_only cannot read them.
        return torch.load(states, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
        raise CheckpointError(f"{states}: corrupt or unreadable DeepSpeed checkpoint ({exc})") from None


def check_resumable(path: Path, model: torch.nn.Module, prefix: str = "model.") -> int:
    """Raise CheckpointError unless `path` can resume `model`; return the checkpoint's global step."""
    path = Path(path)
    if path.is_dir():
        state = _deepspeed_client_state(path)
        weights = state.get("module") or {}
    else:
        state = load_checkpoint_file(path)
        if "state_dict" not in state:
            raise CheckpointError(f"{path}: no 'state_dict' in checkpoint (keys: {sorted(state)[:8]})")
        weights = state["state_dict"]
    expected = {prefix + name: tensor.shape for name, tensor in model.state_dict().items()}
    if weights:
        for name, shape in expected.items():
            if name not in weights:
                raise CheckpointError(f"{path}: tensor '{name}' missing: the checkpoint was written by a "
                                      "different model; use a new --run-dir")
            found = tuple(weights[name].shape)
            if found != tuple(shape) and weights[name].numel() > 0:  # ZeRO-3 stores empty placeholders
                raise CheckpointError(f"{path}: tensor '{name}' has shape {list(found)} but the model "
                                      f"built from the config needs {list(shape)}: different model shape; "
                                      "use a new --run-dir")
        extra = sorted(set(weights) - set(expected))
        if extra:
            raise CheckpointError(f"{path}: unexpected tensor '{extra[0]}': the checkpoint was written by a "
                                  "different model; use a new --run-dir")
    step = state.get("global_step")
    if step is None:
        raise CheckpointError(f"{path}: no 'global_step' in checkpoint: not written by `emformer train`")
    return int(step)


def save_atomic(trainer: Any, path: Path) -> None:
    """trainer.save_checkpoint to a temporary name, then rename into place (every rank must call this)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    is_zero = trainer.is_global_zero
    if is_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
    trainer.strategy.barrier("emformer-ckpt-pre")
    trainer.save_checkpoint(str(tmp), weights_only=False)  # collective; Lightning writes on the ranks that must write
    trainer.strategy.barrier("emformer-ckpt-written")
    if is_zero:
        if tmp.is_dir():
            # Directories cannot be os.replace'd over a non-empty one: move the old aside first.
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    trainer.strategy.barrier("emformer-ckpt-renamed")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
