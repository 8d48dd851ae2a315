"""Lightning's extension points in the run config: `trainer.callbacks` and `trainer.loggers` take lists of
`{class_path: ..., init_args: {...}}`, LightningCLI's convention, e.g.

    trainer:
      callbacks:
        - class_path: lightning.pytorch.callbacks.LearningRateMonitor
          init_args: {logging_interval: step}
      loggers:
        - class_path: lightning.pytorch.loggers.CSVLogger      # save_dir defaults to the run directory

A class path without a dot names a class of `lightning.pytorch.callbacks` (or `.loggers`). Every row the
run logs (metrics.jsonl, wandb) also reaches each configured logger, at its step; Lightning's own logging
(LearningRateMonitor's `lr-AdamW`, ...) goes to them too, every `trainer.log_every` steps.

What enters the run's name: loggers never (they record, they do not train); callbacks do, except the
monitors in MONITORS, so that adding a LearningRateMonitor keeps a run resumable and its name, while an
EarlyStopping makes another run. The shape of each entry is checked with the config (`check_specs`, no
import); the classes are imported and built when the run is built (`instantiate`), where a bad path or
argument is one ConfigError naming its key.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, Optional, Sequence

from emformer.errors import ConfigError

PACKAGES = {"trainer.callbacks": "lightning.pytorch.callbacks", "trainer.loggers": "lightning.pytorch.loggers"}
MONITORS = frozenset(f"lightning.pytorch.callbacks.{name}" for name in (
    "LearningRateMonitor", "DeviceStatsMonitor", "ThroughputMonitor", "ModelSummary", "RichModelSummary",
    "TQDMProgressBar", "RichProgressBar"))
"""callbacks that only observe a run: they stay out of its config hash"""


def full_class_path(class_path: str, key: str) -> str:
    return class_path if "." in class_path else f"{PACKAGES[key]}.{class_path}"


def check_specs(specs: Sequence[Any], key: str) -> None:
    """Each entry is {class_path: str, init_args: mapping (optional)}; ConfigError naming the entry if not."""
    for i, spec in enumerate(specs):
        where = f"{key}[{i}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str) or not spec["class_path"]:
            raise ConfigError(f"{where}: expected {{class_path: package.Class, init_args: {{...}}}}, got {spec!r}")
        unknown = sorted(set(spec) - {"class_path", "init_args"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; an entry has class_path and init_args")
        if not isinstance(spec.get("init_args") or {}, dict):
            raise ConfigError(f"{where}.init_args: expected a mapping of constructor arguments, "
                              f"got {spec['init_args']!r}")


def hashed_callbacks(specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The callbacks that can change what a run computes (all but MONITORS), as they enter the hash."""
    return [spec for spec in specs
            if full_class_path(str(spec.get("class_path", "")), "trainer.callbacks") not in MONITORS]


def resolve_class(class_path: str, section: str, key: str) -> type:
    """The class `class_path` names (short names in `section`'s Lightning package); `key` names it in errors."""
    path = full_class_path(class_path, section)
    module_name, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except ImportError as exc:
        raise ConfigError(f"{key}: class_path {class_path!r}: cannot import module {module_name!r} ({exc})") from None
    except AttributeError:
        raise ConfigError(f"{key}: class_path {class_path!r}: module {module_name!r} has no {name!r}") from None
    if not inspect.isclass(found):
        raise ConfigError(f"{key}: class_path {class_path!r} is not a class")
    return found


def instantiate(specs: Sequence[dict[str, Any]], key: str, base: type,
                run_dir: Optional[Path] = None) -> list[Any]:
    """Build each entry as a `base` (Callback, Logger); a logger taking `save_dir` gets the run directory
    unless init_args name one. ConfigError naming the entry for a bad path, class or argument."""
    # lightning is loaded by the caller (fit.build) already; its configuration error is what its classes raise
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    built = []
    for i, spec in enumerate(specs):
        where = f"{key}[{i}]"
        cls = resolve_class(str(spec["class_path"]), key, f"{where}.class_path")
        if not issubclass(cls, base):
            raise ConfigError(f"{where}.class_path: {cls.__module__}.{cls.__qualname__} is not a "
                              f"{base.__module__}.{base.__qualname__}")
        args = dict(spec.get("init_args") or {})
        if run_dir is not None and "save_dir" not in args and "save_dir" in inspect.signature(cls).parameters:
            args["save_dir"] = str(run_dir)
        try:
            built.append(cls(**args))
        except (TypeError, ValueError, MisconfigurationException) as exc:
            raise ConfigError(f"{where}.init_args: {cls.__qualname__}({', '.join(args)}) refused them: {exc}") from None
    return built
