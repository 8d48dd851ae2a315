"""The models shipped with emformer, by name: `pretrained/<name>/` beside the packages (installed as package
data `emformer.pretrained`), each an export directory (export_format.py). `Clusterer.from_pretrained(NAME)`
and `emformer cluster NAME` resolve a name that is not a directory through `resolve_model_dir`."""
from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

from emformer.errors import CheckpointError
from emformer.models.export_format import CONFIG_FILE

PRETRAINED_PACKAGE = "emformer.pretrained"
PRETRAINED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def pretrained_root() -> Path:
    """The folder of the shipped models: package data `emformer.pretrained` when installed, else the
    repository's pretrained/ (an editable install maps it there too)."""
    try:
        root = Path(str(importlib.resources.files(PRETRAINED_PACKAGE)))
        if root.is_dir():
            return root
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[1] / "pretrained"


def shipped_models() -> list[str]:
    root = pretrained_root()
    return sorted(p.name for p in root.iterdir() if (p / CONFIG_FILE).is_file()) if root.is_dir() else []


def resolve_model_dir(model: str | Path) -> Path:
    """An export directory, or the name of a shipped model (e.g. "emformer-gmm-small") when no such
    directory exists; a missing one is a CheckpointError listing the shipped names."""
    path = Path(model)
    if path.exists() or not PRETRAINED_NAME.match(str(model)):
        return path
    shipped = pretrained_root() / str(model)
    if (shipped / CONFIG_FILE).is_file():
        return shipped
    raise CheckpointError(f"{model}: no such export directory and no shipped model of that name (shipped: "
                          f"{', '.join(shipped_models()) or 'none'}; make one with `emformer export RUN_DIR --out DIR`)")
