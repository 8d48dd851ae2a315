"""Loading an export directory (export_format.py: model.safetensors + config.json) back into a
ClusterTransformer, with torch and safetensors only (no lightning, no deepspeed), every file checked against
config.json first so a mismatch is one CheckpointError naming both files."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from emformer.atomic import sha256_file
from emformer.errors import CheckpointError
from emformer.models.export_format import CONFIG_FILE, WEIGHTS_FILE, read_export_config
from emformer.models.registry import resolve_model_dir
from emformer.models.transformer import ClusterTransformer, TransformerConfig

def load_exported_model(model_dir: str | Path, device: str | torch.device = "cpu",
                        config: Optional[dict[str, Any]] = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the ClusterTransformer of an export and load its weights, checking every file against config.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model_dir = resolve_model_dir(model_dir)
    config = config if config is not None else read_export_config(model_dir)
    weights_path = model_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing (an export holds {WEIGHTS_FILE} next to {CONFIG_FILE})")
    expected = config.get("files", {}).get(WEIGHTS_FILE, {}).get("sha256")
    if expected is not None and sha256_file(weights_path) != expected:
        raise CheckpointError(f"{weights_path}: does not match {model_dir / CONFIG_FILE} (sha256 differs from the "
                              f"one recorded at export): the files come from different exports; re-export")
    try:
        architecture = TransformerConfig.from_dict(dict(config["architecture"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{model_dir / CONFIG_FILE}: bad 'architecture' section ({exc})") from None
    model = ClusterTransformer(architecture)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    check_state_dict(model, state, where=f"{weights_path} vs {model_dir / CONFIG_FILE}")
    model.load_state_dict(state, strict=True)
    model.eval().to(device)
    return model, config


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise CheckpointError naming missing, unexpected or mis-shaped tensors (before load_state_dict does,
    less clearly)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{key}: file {tuple(state[key].shape)}, architecture {tuple(own[key].shape)}"
              for key in sorted(set(own) & set(state)) if tuple(own[key].shape) != tuple(state[key].shape)]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if shapes:
        problems.append(f"shape mismatch in {len(shapes)} tensor(s): " + "; ".join(shapes[:3]) + (" ..." if len(shapes) > 3 else ""))
    if problems:
        raise CheckpointError(f"{where}: the weights do not fit the architecture: {', '.join(problems)}")
