"""Read a sweep's run directories (config.yaml + metrics.jsonl + DONE) into plain records for the report.

Nothing here needs wandb, torch or lightning: the run directory is the whole record (contracts page).
Every run the sweep knows of becomes a `RunRecord`, readable or not, so the report can list missing and
partial runs instead of dropping them; a metrics line that is not a JSON object with "step" and "split"
becomes a problem naming its file and line, and the rest of the file is still used.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from emformer.errors import ConfigError

DONE, PARTIAL, NO_METRICS, MISSING = "done", "partial", "no metrics", "missing"

# Keys that do not change what a run computes, or that are the seed: two runs that differ only in these
# are the same point of the sweep (seeds of one point are what the bootstrap resamples).
SEED_KEYS = ("trainer.seed", "data.seed")
_IGNORED_PREFIXES = ("wandb.", "strategy.")
_IGNORED_KEYS = {
    "name", "trainer.progress", "trainer.threads", "trainer.log_every", "trainer.ckpt_every",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "data.num_workers",
    # N replaces these two (pool_size means nothing for fresh episodes)
    "data.source", "data.pool_size",
}

SHORT_NAMES = {
    "N": "N", "model.depth": "L", "model.heads": "M", "model.width": "D", "task.separation": "Δ",
    "task.k": "k", "task.n": "n", "task.d": "d", "task.init": "init", "task.weights": "weights",
    "task.noise": "noise", "task.init_noise": "ρ", "trainer.max_steps": "steps",
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
    values = {k: v for k, v in run.flat.items()
              if k not in _IGNORED_KEYS and k not in SEED_KEYS and not k.startswith(_IGNORED_PREFIXES)}
    values["N"] = run.pool_size
    return values


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def read_metrics(path: Path, finished: bool) -> tuple[list[dict], list[dict], list[str]]:
    """(train rows, val rows, problems). A resumed run never repeats a step, but if one does the later
    row wins. An unterminated last line of an unfinished run is a write in progress, not corruption."""
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    problems: list[str] = []
    try:
        text = path.read_text()
    except OSError as exc:
        return [], [], [f"{path}: cannot read: {exc}"]
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        in_progress = number == len(lines) and not finished  # no trailing newline yet
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if not in_progress:
                problems.append(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(row, dict) or "step" not in row or row.get("split") not in ("train", "val"):
            problems.append(f"{path}:{number}: expected an object with \"step\" and \"split\" train|val, "
                            f"got {line[:80]!r}")
            continue
        if not isinstance(row["step"], (int, float)):
            problems.append(f"{path}:{number}: \"step\" is not a number: {row['step']!r}")
            continue
        (val if row["split"] == "val" else train)[int(row["step"])] = row
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)], problems


def read_run(path: Path) -> RunRecord:
    path = Path(path)
    if not path.is_dir():
        return RunRecord(path, MISSING, note="run directory does not exist (never started)")
    config_path = path / "config.yaml"
    if not config_path.is_file():
        return RunRecord(path, MISSING, note="no config.yaml (never started)")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
        if not isinstance(config, dict):
            raise ValueError(f"expected a mapping, got {type(config).__name__}")
    except (yaml.YAMLError, ValueError, OSError) as exc:
        return RunRecord(path, MISSING, problems=[f"{config_path}: unreadable config: {exc}"],
                         note="config.yaml unreadable")
    finished = (path / "DONE").is_file()
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        state = NO_METRICS
        note = "DONE but no metrics.jsonl" if finished else "no metrics.jsonl yet (not started, or crashed early)"
        return RunRecord(path, state, config=config, note=note)
    train, val, problems = read_metrics(metrics, finished)
    record = RunRecord(path, DONE if finished else PARTIAL, config, train, val, problems)
    max_steps = config.get("trainer", {}).get("max_steps")
    last = max([r["step"] for r in train + val], default=None)
    if not finished:
        record.note = f"no DONE: last logged step {last} of {max_steps}"
    elif not val:
        record.note = "DONE but no val rows in metrics.jsonl"
    return record


def _index_run_dirs(sweep_dir: Path) -> tuple[list[Path], list[str]]:
    """Run dirs named by index.json (any of the shapes a sweep index may take); problems if unreadable."""
    index = sweep_dir / "index.json"
    if not index.is_file():
        return [], []
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, OSError) as exc:
        return [], [f"{index}: unreadable index: {exc}"]
    entries: Iterable[Any]
    if isinstance(data, dict):
        entries = data.get("points") or data.get("runs") or []
        if isinstance(entries, dict):
            entries = [dict(v, name=k) if isinstance(v, dict) else v for k, v in entries.items()]
    else:
        entries = data
    dirs = []
    for entry in entries:
        where = None
        if isinstance(entry, str):
            where = entry
        elif isinstance(entry, dict):
            where = next((entry[k] for k in ("run_dir", "dir", "path") if isinstance(entry.get(k), str)), None)
            if where is None and isinstance(entry.get("name"), str):
                where = f"runs/{entry['name']}"
        if where:
            path = Path(where)
            dirs.append(path if path.is_absolute() else sweep_dir / path)
    return dirs, []


def read_sweep(sweep_dir: Path) -> tuple[list[RunRecord], list[str]]:
    """Every run of the sweep: those index.json names (started or not) and every run dir found on disk."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep directory not found: {sweep_dir}")
    named, problems = _index_run_dirs(sweep_dir)
    found = sorted({p.parent for p in sweep_dir.rglob("config.yaml") if "wandb" not in p.parts
                    and p.parent != sweep_dir and not p.parent.name.startswith(".")})
    seen: dict[Path, None] = {}
    for path in [*named, *found]:
        seen.setdefault(path.resolve(), None)
    if not seen and (sweep_dir / "config.yaml").is_file():
        seen[sweep_dir.resolve()] = None  # a single run dir given as the "sweep"
    return [read_run(p) for p in seen], problems


def sweep_name(sweep_dir: Path) -> str:
    spec = Path(sweep_dir) / "sweep.yaml"
    if spec.is_file():
        try:
            data = yaml.safe_load(spec.read_text()) or {}
            if isinstance(data, dict) and data.get("name"):
                return str(data["name"])
        except yaml.YAMLError:
            pass
    return Path(sweep_dir).resolve().name
