"""Read a sweep's run directories (config, metrics and DONE, through train/rundir.py) into plain records for the report.

Nothing here needs wandb, torch or lightning: the run directory is the whole record (contracts page).
Every run the sweep knows of becomes a `RunRecord`, readable or not, so the report can list missing and
partial runs instead of dropping them; a metrics line that is not a JSON object with "step" and "split"
becomes a problem naming its file and line, and the rest of the file is still used.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from emformer.errors import ConfigError
from emformer.train import rundir
from emformer.train.config import neutral_defaults
from emformer.train.extensions import hashed_callbacks

DONE, PARTIAL, NO_METRICS, MISSING = "done", "partial", "no metrics", "missing"

# Keys that do not change what a run computes, or that are the seed: two runs that differ only in these
# are the same point of the sweep (seeds of one point are what the bootstrap resamples).
SEED_KEYS = ("trainer.seed", "data.seed")
_IGNORED_PREFIXES = ("wandb.", "strategy.")
_IGNORED_KEYS = {
    "name", "trainer.progress", "trainer.threads", "trainer.log_every", "trainer.ckpt_every",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.loggers", "trainer.callbacks",
    "data.num_workers",
    # derived from data.seed (each seed its own held-out sets): they follow the seed
    "eval.seed", "eval.test_seed",
    # N replaces these two (pool_size means nothing for fresh episodes)
    "data.source", "data.pool_size",
}

SHORT_NAMES = {
    "N": "N", "model.depth": "L", "model.heads": "M", "model.width": "D", "task.separation": "Δ",
    "task.k": "k", "task.n": "n", "task.d": "d", "task.init": "init", "task.weights": "weights",
    "task.noise": "noise", "task.init_noise": "ρ", "trainer.max_steps": "steps", "model.passes": "T",
}


@dataclass
class RunRecord:
    """One run directory of a sweep, as far as it could be read."""

    path: Path
    state: str
    """done (DONE present) | partial (metrics, no DONE) | no metrics | missing (no run dir or config)"""
    config: dict[str, Any] = field(default_factory=dict)
    train_rows: list[dict[str, Any]] = field(default_factory=list)
    val_rows: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """corrupt metrics lines and unreadable files, each naming its file (and line)"""
    note: str = ""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def flat(self) -> dict[str, Any]:
        return flatten(self.config)

    @property
    def seed(self) -> tuple[Any, ...]:
        flat = self.flat
        return tuple(flat.get(k) for k in SEED_KEYS)

    @property
    def pool_size(self) -> Optional[float]:
        """N: data.pool_size for source=pool, ∞ for fresh episodes, None for shards or no config."""
        data = self.config.get("data", {}) if self.config else {}
        source = data.get("source")
        if source == "fresh":
            return math.inf
        if source == "pool":
            return float(data.get("pool_size", 0))
        return None

    @functools.cached_property
    def episodes(self) -> Optional[dict[str, Any]]:
        """The final evaluation per eval episode (rundir.read_episode_results), None when the run has none
        or it is not the final row's (a run extended since): then only the row's means are known."""
        if not self.complete:
            return None
        try:
            found = rundir.read_episode_results(self.path)
        except ConfigError as exc:
            self.problems.append(str(exc))
            return None
        final = self.final or {}
        return found if found is not None and found["step"] == final.get("step") else None

    @property
    def final(self) -> Optional[dict[str, Any]]:
        """The last val row (highest step)."""
        return max(self.val_rows, key=lambda r: r["step"]) if self.val_rows else None

    @property
    def complete(self) -> bool:
        """Enters the checks: finished (DONE) and has at least one val row."""
        return self.state == DONE and bool(self.val_rows)

    def point_key(self) -> tuple[tuple[str, Any], ...]:
        """What the run computes, seeds left out: runs with equal keys are seeds of one point."""
        return tuple(sorted(point_values(self).items()))


def point_values(run: RunRecord) -> dict[str, Any]:
    # a key newer than the run's config.yaml is at its neutral value there: runs made before and after it
    # joined are one point when they agree (and a sweep does not seem to vary it)
    flat = {**neutral_defaults(), **run.flat}
    values = {k: v for k, v in flat.items()
              if k not in _IGNORED_KEYS and k not in SEED_KEYS and not k.startswith(_IGNORED_PREFIXES)}
    values["N"] = run.pool_size
    # as in the run's name: callbacks that only observe (LearningRateMonitor ...) do not make another point
    training = hashed_callbacks(run.config.get("trainer", {}).get("callbacks") or [])
    if training:
        values["trainer.callbacks"] = json.dumps(training, sort_keys=True)
    return values


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def read_run(path: Path) -> RunRecord:
    path = Path(path)
    if not path.is_dir():
        return RunRecord(path, MISSING, note="run directory does not exist (never started)")
    if not rundir.has_config(path):
        return RunRecord(path, MISSING, note=f"no {rundir.CONFIG} (never started)")
    try:
        config = rundir.read_config(path)
    except ConfigError as exc:
        return RunRecord(path, MISSING, problems=[str(exc)], note=f"{rundir.CONFIG} unreadable")
    finished = rundir.is_done(path)
    if not rundir.metrics_path(path).is_file():
        state = NO_METRICS
        note = (f"{rundir.DONE} but no {rundir.METRICS}" if finished
                else f"no {rundir.METRICS} yet (not started, or crashed early)")
        return RunRecord(path, state, config=config, note=note)
    train, val, problems = rundir.read_metrics_checked(path, finished)
    record = RunRecord(path, DONE if finished else PARTIAL, config, train, val, problems)
    max_steps = config.get("trainer", {}).get("max_steps")
    last = max([r["step"] for r in train + val], default=None)
    if not finished:
        record.note = f"no DONE: last logged step {last} of {max_steps}"
    elif not val:
        record.note = f"{rundir.DONE} but no val rows in {rundir.METRICS}"
    return record


def read_sweep(sweep_dir: Path) -> tuple[list[RunRecord], list[str]]:
    """Every run of the sweep: those index.json names (started or not) and every run dir found on disk."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep directory not found: {sweep_dir}")
    named, problems = rundir.index_run_dirs(sweep_dir)
    found = rundir.run_dirs_on_disk(sweep_dir)
    seen: dict[Path, None] = {}
    for path in [*named, *found]:
        seen.setdefault(path.resolve(), None)
    if not seen and rundir.has_config(sweep_dir):
        seen[sweep_dir.resolve()] = None  # a single run dir given as the "sweep"
    return [read_run(p) for p in seen], problems


def sweep_name(sweep_dir: Path) -> str:
    spec = rundir.spec_path(sweep_dir)
    if spec.is_file():
        try:
            data = yaml.safe_load(spec.read_text()) or {}
            if isinstance(data, dict) and data.get("name"):
                return str(data["name"])
        except yaml.YAMLError:
            pass
    return Path(sweep_dir).resolve().name


def smallest_effect(sweep_dir: Path, default: float) -> float:
    """The sweep spec's report.smallest_effect (sweep.yaml), `default` when it declares none."""
    spec = rundir.spec_path(sweep_dir)
    if spec.is_file():
        try:
            data = yaml.safe_load(spec.read_text()) or {}
        except yaml.YAMLError:
            return default
        value = (data.get("report") or {}).get("smallest_effect") if isinstance(data, dict) else None
        if isinstance(value, (int, float)) and 0 < value < 1:
            return float(value)
    return default
