"""Checkpoint files of a run: the one reader of Lightning and DeepSpeed checkpoints (for resume and export),
atomic saving, and the check before resuming.

`checkpoints/last.ckpt` and `checkpoints/best.ckpt` (paths: train/rundir.py) are Lightning checkpoints (a
file; a directory under DeepSpeed). Saving goes to a temporary name first and is renamed into place, so a
crash mid-save leaves the previous checkpoint intact. Before resuming, `check_resumable` reads the checkpoint
and compares every tensor shape with the model about to be trained, so a mismatch fails with the file and the
tensor named instead of deep inside Lightning. `load_checkpoint` gives export (and the report's shift check)
the model's fp32 weights and run config, consolidating DeepSpeed ZeRO shards with DeepSpeed's zero_to_fp32.
Lightning and DeepSpeed are never imported for a Lightning checkpoint, and DeepSpeed only for a ZeRO one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from emformer.errors import DEEPSPEED_INSTALL, CheckpointError
from emformer.train.rundir import BEST, LAST, checkpoint_dir


@dataclasses.dataclass
class LoadedCheckpoint:
    """What an export needs from a training checkpoint, whatever its format."""

    path: Path
    kind: str  # "lightning" | "deepspeed"
    state_dict: dict[str, torch.Tensor]  # ClusterTransformer keys ("model." stripped), fp32
    run_config: dict[str, Any]
    step: Optional[int]
    zero_stage: Optional[int] = None


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


def check_resumable(path: Path, model: torch.nn.Module, prefix: str = "model.") -> int:
    """Raise CheckpointError unless `path` can resume `model`; return the checkpoint's global step."""
    path = Path(path)
    try:
        if path.is_dir():
            state = _deepspeed_states(path)[2]
            weights = state.get("module") or {}
        else:
            state = _torch_load(path)
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: not a Lightning checkpoint (top level is {type(state).__name__})")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; delete it to start over, or restore it from a copy") from None
    if not path.is_dir():
        if "state_dict" not in state:
            raise CheckpointError(f"{path}: no 'state_dict' in checkpoint (keys: {sorted(state)[:8]})")
        weights = state["state_dict"]
    if weights:
        _check_shapes(weights, model, path, prefix, "use a new --run-dir")
    step = state.get("global_step")
    if step is None:
        raise CheckpointError(f"{path}: no 'global_step' in checkpoint: not written by `emformer train`")
    return int(step)


def _check_shapes(weights: dict[str, Any], model: torch.nn.Module, path: Path, prefix: str, advice: str) -> None:
    """Raise CheckpointError, naming the file and the tensor, unless `weights` has exactly the tensors of
    `model` (keys `prefix` + name) in its shapes."""
    expected = {prefix + name: tensor.shape for name, tensor in model.state_dict().items()}
    for name, shape in expected.items():
        if name not in weights:
            raise CheckpointError(f"{path}: tensor '{name}' missing: the checkpoint was written by a "
                                  f"different model; {advice}")
        found = tuple(weights[name].shape)
        if found != tuple(shape) and weights[name].numel() > 0:  # ZeRO-3 stores empty placeholders
            raise CheckpointError(f"{path}: tensor '{name}' has shape {list(found)} but the model "
                                  f"built from the config needs {list(shape)}: different model shape; {advice}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor '{extra[0]}': the checkpoint was written by a "
                              f"different model; {advice}")


def init_path(source: str | Path) -> Path:
    """trainer.init_from as a checkpoint path: a run dir stands for its checkpoints/best.ckpt."""
    path = Path(source)
    if path.is_dir() and checkpoint_dir(path).is_dir():  # a run dir (a DeepSpeed checkpoint has no checkpoints/)
        best = checkpoint_dir(path) / BEST
        if not best.exists():
            raise CheckpointError(f"trainer.init_from={source}: a directory without {best.relative_to(path)} "
                                  "(give a checkpoint file, or a run dir that has a best checkpoint)")
        return best
    if not path.exists():
        raise CheckpointError(f"trainer.init_from={source}: no such checkpoint file, DeepSpeed checkpoint "
                              "directory or run dir")
    return path


def load_initial_weights(source: str | Path, model: torch.nn.Module) -> LoadedCheckpoint:
    """trainer.init_from: copy a checkpoint's model weights (fp32, any format load_checkpoint reads) into
    `model`, after checking every tensor's name and shape against it. Returns the checkpoint read."""
    loaded = load_checkpoint(init_path(source))
    _check_shapes(loaded.state_dict, model, loaded.path, "",
                  "trainer.init_from needs a checkpoint of the model the config builds (same model.* shapes)")
    model.load_state_dict(loaded.state_dict)  # copies into the model's own tensors, in their dtype
    return loaded


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


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read a Lightning checkpoint file or a DeepSpeed checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        return _load_deepspeed(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    return LoadedCheckpoint(path=path, kind="lightning", state_dict=_model_weights(checkpoint["state_dict"], path),
                            run_config=_run_config(checkpoint, path), step=_step(checkpoint))


def _torch_load(path: Path, trusted: bool = False) -> Any:
    """torch.load of a checkpoint file, tensors and plain containers only unless `trusted`."""
    if not zipfile.is_zipfile(path):  # every torch.save since 1.6 is a zip archive
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint (not a torch.save zip archive)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if trusted:
            # DeepSpeed pickles its own config objects into its files (its zero_to_fp32 loads them with
            # weights_only=False too); only used for the model-states file of a DeepSpeed checkpoint.
            return torch.load(path, map_location="cpu", weights_only=False)
        lines = str(exc).splitlines()
        reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise CheckpointError(f"{path}: holds objects other than tensors and plain containers, refused for safety "
                              f"({reason})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _model_weights(state_dict: dict[str, Any], where: Path) -> dict[str, torch.Tensor]:
    """The ClusterTransformer's tensors: keys under `model.` (wrapper prefixes removed), as fp32."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("_forward_module.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith("model.") and isinstance(value, torch.Tensor):
            out[key[len("model."):]] = value.detach().to("cpu", torch.float32)
    if not out:
        raise CheckpointError(f"{where}: no weights under the 'model.' prefix (keys: {sorted(state_dict)[:5]} ...)")
    return out


def _run_config(checkpoint: dict[str, Any], where: Path) -> dict[str, Any]:
    config = (checkpoint.get("hyper_parameters") or {}).get("config")
    if not isinstance(config, dict) or "task" not in config or "model" not in config:
        raise CheckpointError(f"{where}: hyper_parameters['config'] is missing or has no task/model sections; "
                              f"was it written by `emformer train`?")
    return config


def _step(checkpoint: dict[str, Any]) -> Optional[int]:
    step = checkpoint.get("global_step")
    return int(step) if isinstance(step, (int, np.integer)) or (isinstance(step, torch.Tensor) and step.numel() == 1) else None


def _deepspeed_states(path: Path) -> tuple[str, Path, dict[str, Any]]:
    """A DeepSpeed checkpoint directory as Lightning's DeepSpeedStrategy writes it: `latest` names the tag
    folder (Lightning uses "checkpoint"), which holds the client state in mp_rank_00_model_states.pt
    (ZeRO-3: zero_pp_rank_0_mp_rank_00_model_states.pt) and the fp32 partitions in *_optim_states.pt.
    Returns (tag, model-states file, client state)."""
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
    else:
        tags = sorted(p.name for p in path.iterdir() if p.is_dir() and any(p.glob("*model_states.pt")))
        if len(tags) != 1:
            raise CheckpointError(f"{path}: a directory but not a DeepSpeed checkpoint (no 'latest' file and "
                                  f"{len(tags)} folders holding *model_states.pt)")
        tag = tags[0]
    tag_dir = path / tag
    candidates = [tag_dir / "mp_rank_00_model_states.pt", tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    states_file = next((c for c in candidates if c.is_file()), None)
    if states_file is None:
        raise CheckpointError(f"{tag_dir}: no model-states file ({', '.join(c.name for c in candidates)})")
    return tag, states_file, _torch_load(states_file, trusted=True)


def _load_deepspeed(path: Path) -> LoadedCheckpoint:
    """A DeepSpeed checkpoint directory, consolidated to fp32 weights (zero_to_fp32) when it holds ZeRO shards."""
    tag, states_file, client = _deepspeed_states(path)
    tag_dir = states_file.parent
    run_config = _run_config(client, states_file)
    zero_stage = None
    if any(tag_dir.glob("*_optim_states.pt")):
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as exc:
            raise CheckpointError(f"{path}: a DeepSpeed ZeRO checkpoint; exporting it needs deepspeed "
                                  f"({DEEPSPEED_INSTALL}): {exc}") from None
        # zero_to_fp32 prints a line per step and two progress bars; keep them for the error message only.
        chatter = io.StringIO()
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError, AssertionError) as exc:
            raise CheckpointError(f"{path}: DeepSpeed could not consolidate the ZeRO shards ({exc}); "
                                  f"its output: {' | '.join(chatter.getvalue().split(chr(10))[-3:])}") from None
        zero_stage = _zero_stage(client)
    elif isinstance(client.get("module"), dict):
        state = client["module"]  # no ZeRO partitions: the full weights are in the model states
    else:
        raise CheckpointError(f"{states_file}: no weights ('module') and no *_optim_states.pt shards beside it")
    return LoadedCheckpoint(path=path, kind="deepspeed", state_dict=_model_weights(state, path), run_config=run_config,
                            step=_step(client), zero_stage=zero_stage)


def _zero_stage(client: dict[str, Any]) -> Optional[int]:
    ds_config = client.get("ds_config")
    try:
        return int(ds_config["zero_optimization"]["stage"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        return None
