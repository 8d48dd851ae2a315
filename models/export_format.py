"""The export directory format (DESIGN §4): file names, config.json's format tag and version, and its one
reader and writer, shared by `emformer export` (train/export/) and the `Clusterer` (models/clusterer.py).

    model.safetensors   weights (fp32)
    config.json         architecture, task, supported k / d / n, input_scale, training, eval, sha256 of every
                        file, format + format_version; written last, so it vouches for the files beside it;
                        optionally clusterer_defaults (the Clusterer parameters this model is meant to run with)
    README.md           the model card
    model.onnx          optional

Files are published atomically and readable by others (an export is meant to be shared).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from emformer.atomic import atomic_write, sha256_file
from emformer.errors import CheckpointError
from emformer.models.calibration import KPosterior

EXPORT_FORMAT = "emformer-export"
EXPORT_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
CARD_FILE = "README.md"
CLUSTERER_DEFAULTS = "clusterer_defaults"
COUNT_HEAD = "count_head"
"""config.json's P(k | X) calibration: {"temperature", "bic_weight", "bic_pool", "bic_floor",
"bic_floor_per_log_n" (the fields of models.calibration.KPosterior), "fitted_on": ..., "test": ...} (exports
with a count head; a field absent reads as KPosterior's default: an export without any reads the count head's
softmax alone)"""
RETIRED_COUNT_FIELDS = ("bic_share", "bic_share_per_log_n")
"""the mixture form of P(k | X) that one earlier emformer fitted; no longer read (the log-linear pool replaced it)"""
DEFAULTABLE = {"n_init": 1, "em_steps": 0, "n_passes": 1, "init_iters": 0}
"""the Clusterer parameters an export may set defaults for, with their least value (integers; what a user
passes still wins)"""


def clusterer_defaults(config: dict[str, Any], where: str) -> dict[str, int]:
    """config.json's clusterer_defaults ({} when absent), checked: known keys, integer values."""
    defaults = config.get(CLUSTERER_DEFAULTS, {})
    if not isinstance(defaults, dict):
        raise CheckpointError(f"{where}: '{CLUSTERER_DEFAULTS}' must be an object, got {defaults!r}")
    for key, value in defaults.items():
        if key not in DEFAULTABLE:
            raise CheckpointError(f"{where}: {CLUSTERER_DEFAULTS}.{key}: not a parameter an export may set; "
                                  f"expected one of {', '.join(DEFAULTABLE)}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"{where}: {CLUSTERER_DEFAULTS}.{key}: expected an integer, got {value!r}")
    return dict(defaults)


def count_posterior(config: dict[str, Any], where: str) -> KPosterior:
    """P(k | X)'s numbers (models/calibration.py): the count head's temperature, the BIC vote's sharpness,
    weight and floor; the count head's softmax alone when the export has no calibration."""
    section = config.get(COUNT_HEAD, {})
    if not isinstance(section, dict):
        raise CheckpointError(f"{where}: '{COUNT_HEAD}' must be an object, got {section!r}")
    retired = [key for key in RETIRED_COUNT_FIELDS if section.get(key) is not None]
    if retired:
        raise CheckpointError(f"{where}: {COUNT_HEAD}.{retired[0]}: P(k | X) in the mixture form of an earlier emformer, "
                              f"which this one no longer reads; refit it with `emformer export --rescore MODEL_DIR`")
    values: dict[str, Any] = {}
    for key, least, check in (("temperature", "> 0", lambda v: v > 0), ("bic_weight", ">= 0", lambda v: v >= 0),
                              ("bic_pool", ">= 0 (or null)", lambda v: v >= 0), ("bic_floor", "", math.isfinite),
                              ("bic_floor_per_log_n", "", math.isfinite)):
        if key not in section or (key == "bic_pool" and section[key] is None):
            continue
        value = section[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not check(value):
            raise CheckpointError(f"{where}: {COUNT_HEAD}.{key}: expected a finite number {least}, got {value!r}")
        values[key] = float(value)
    return KPosterior(**values)


def read_export_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of an export directory, checked for format and version."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such export directory (make one with `emformer export RUN_DIR --out DIR`)")
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {model_dir} is not an emformer export (`emformer export` writes it)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path}: expected 'format': '{EXPORT_FORMAT}', got {config.get('format') if isinstance(config, dict) else config!r}")
    version = config.get("format_version")
    if not isinstance(version, int) or version > EXPORT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported by this emformer "
                              f"(reads up to {EXPORT_FORMAT_VERSION}); upgrade emformer")
    for key in ("architecture", "task", "supported"):
        if not isinstance(config.get(key), dict):
            raise CheckpointError(f"{path}: missing the '{key}' section")
    clusterer_defaults(config, str(path))
    return config


def write_export_config(model_dir: str | Path, config: dict[str, Any]) -> None:
    """config.json, sorted keys; call it last (it vouches for the files written before it)."""
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    publish(Path(model_dir) / CONFIG_FILE, lambda tmp: tmp.write_text(text))


def file_entry(path: Path) -> dict[str, Any]:
    """config.json's record of one file of the export."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def publish(path: Path, write: Callable[[Path], Any]) -> None:
    """Atomic write, readable by others (mkstemp creates files 0600; an export is meant to be shared)."""
    umask = os.umask(0)
    os.umask(umask)

    def write_public(tmp: Path) -> None:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)

    atomic_write(path, write_public)
