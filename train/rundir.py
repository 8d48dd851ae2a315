"""The run directory and the sweep directory (DESIGN §4): every file name, and the one reader/writer of each.

A run directory (`emformer train --run-dir`):

    config.yaml        the resolved config (written at start; one run dir belongs to one config)
    meta.json          versions, host, parameter count, commit, one entry per start
    metrics.jsonl      one JSON object per line ({"step", "split": train|val, ...}), append-only
    DONE               JSON {"step", "val": final val row, "finished_at", "run_dir"}: the run is finished
    episodes.npz       the final evaluation per eval episode (`write_episode_results`): what the report's
                       intervals resample
    checkpoints/       last.ckpt and best.ckpt (Lightning files, or DeepSpeed directories)
    curves.png, wandb_id, wandb/, console.log

A sweep directory (`emformer sweep SPEC --out DIR`): sweep.yaml (the resolved spec), index.json
({"name", "points": [{"id", "name", "run_dir", "overrides", "seed"}]}), runs/<name>/ per point, local/<id>.json
(one record per local launch) and slurm/ (the SLURM backend's scripts, submissions.json and logs, written by
emformer.slurm.launcher).

metrics.jsonl has two readers: `read_metrics_checked` for the report (every bad line becomes a problem naming
the file and line; an unterminated last line of an unfinished run is a write in progress, not corruption)
and `read_metrics` for a job that may be running right now (lines that do not parse are skipped).
"""
from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import yaml

from emformer.atomic import atomic_write, atomic_write_json, atomic_write_text
from emformer.errors import ConfigError
from emformer.train.config import save_yaml

CONFIG = "config.yaml"
META = "meta.json"
METRICS = "metrics.jsonl"
DONE = "DONE"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
BEST = "best.ckpt"
CURVES = "curves.png"
EPISODES = "episodes.npz"
WANDB_ID = "wandb_id"
CONSOLE_LOG = "console.log"

SWEEP_SPEC = "sweep.yaml"
INDEX = "index.json"
LOCAL_LAUNCHES = "local"


# ------------------------------------------------------------------------------------------- config.yaml
def config_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CONFIG


def has_config(run_dir: str | os.PathLike) -> bool:
    return config_path(run_dir).is_file()


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's config.yaml as plain nested dicts; ConfigError naming the file when missing or not a mapping."""
    path = config_path(run_dir)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: unreadable config: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: unreadable config: expected a mapping, got {type(config).__name__}")
    return config


def write_config(run_dir: str | os.PathLike, config: Any) -> None:
    """config.yaml, resolved (an OmegaConf config or a plain dict)."""
    save_yaml(config, config_path(run_dir))


# ------------------------------------------------------------------------------------------- meta.json
def read_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    """meta.json as a dict; {} when absent or unreadable (it describes the run, it decides nothing)."""
    return _read_json_object(Path(run_dir) / META)


def write_meta(run_dir: str | os.PathLike, meta: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / META, meta)


# ------------------------------------------------------------------------------------------- metrics.jsonl
def metrics_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / METRICS


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a run's metrics.jsonl, for a run that may be writing it now: lines that do not parse (a torn
    last line after a crash mid-write) are skipped; no file is no rows."""
    path = metrics_path(run_dir)
    try:
        text = path.read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_metrics_checked(run_dir: str | os.PathLike, finished: bool) -> tuple[list[dict], list[dict], list[str]]:
    """(train rows, val rows, problems), each list ordered by step. Every line that is not a JSON object with a
    numeric "step" and "split" train|val becomes a problem "FILE:LINE: ..." and the rest is still used. A
    resumed run never repeats a step, but if one does the later row wins. An unterminated last line of an
    unfinished run is a write in progress, not corruption."""
    path = metrics_path(run_dir)
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


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """The writer of metrics.jsonl: append rows, flush each; `truncate_after(step)` on resume."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = metrics_path(run_dir)
        self._handle: Any = None

    def truncate_after(self, step: int) -> int:
        """Drop rows with step > `step` (rewritten atomically); return how many were dropped."""
        if not self.path.is_file():
            return 0
        rows = read_metrics(self.run_dir)
        kept = [row for row in rows if int(row.get("step", 0)) <= step]
        dropped = len(rows) - len(kept)
        text = "".join(json.dumps(row) + "\n" for row in kept)
        if dropped or text != self.path.read_text():  # also repairs a torn last line
            self.close()
            atomic_write_text(self.path, text)
        return dropped

    def append(self, row: dict[str, Any]) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a")
        self._handle.write(json.dumps({key: _clean(value) for key, value in row.items()}) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


# ------------------------------------------------------------------------------------------- DONE
def done_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / DONE


def is_done(run_dir: str | os.PathLike) -> bool:
    return done_path(run_dir).is_file()


def read_done(run_dir: str | os.PathLike) -> dict[str, Any]:
    """DONE's record ({"step", "val", ...}); {} when the run is not finished or the file is unreadable."""
    return _read_json_object(done_path(run_dir))


def write_done(run_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    atomic_write_json(done_path(run_dir), record)


def clear_done(run_dir: str | os.PathLike) -> None:
    """The run is no longer finished (`emformer train --extend` continues it)."""
    done_path(run_dir).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- episodes.npz
EPISODE_METHODS = ("model", "em", "lloyd", "oracle", "init")
"""whose err_* / loss_* an episode file may hold (lloyd has no loss; init only on tasks with one)"""


def episodes_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / EPISODES


def _per_episode(points: np.ndarray, ndim: int) -> np.ndarray:
    """points [E] shaped to broadcast against an [E] or [E, T] array of error rates or counts."""
    return points.reshape(-1, *[1] * (ndim - 1))


def write_episode_results(run_dir: str | os.PathLike, figures: dict[str, np.ndarray], step: int, eval_seed: int) -> None:
    """Store one evaluation per episode: `figures` holds points and k ([E] integers) and err_<method> /
    loss_<method> ([E] floats, as ClusterModule.episode_results gives them; err_pass / err_em_iter [E, T] of a
    model trained to iterate). An error rate is stored as its count of mis-clustered points (err · points, an
    integer), so the file is small and the means exact."""
    points = np.asarray(figures["points"]).astype(np.int64)
    arrays: dict[str, np.ndarray] = {"points": points.astype(np.uint16 if points.max(initial=0) < 2**16 else np.int64),
                                     "k": np.asarray(figures["k"]).astype(np.uint8),
                                     "step": np.asarray(int(step)), "eval_seed": np.asarray(int(eval_seed))}
    for key, value in figures.items():
        if key.startswith("err_"):
            rates = np.asarray(value, dtype=np.float64)
            counts = np.rint(rates * _per_episode(points, rates.ndim)).astype(np.int64)
            arrays[f"errors_{key[4:]}"] = counts.astype(arrays["points"].dtype)
        elif key.startswith("loss_"):
            arrays[key] = np.asarray(value, dtype=np.float32)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    atomic_write(episodes_path(run_dir), write)


def read_episode_results(run_dir: str | os.PathLike) -> Optional[dict[str, Any]]:
    """{"step", "eval_seed", "points" [E], "k" [E], "err_<method>" [E] (rates; [E, T] for err_pass and
    err_em_iter), "loss_<method>" [E]} as float64 arrays, or None when the run has no episode file;
    ConfigError naming the file when it is unreadable."""
    path = episodes_path(run_dir)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            raw = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path}: not a readable episode file ({exc}); re-run the evaluation or delete it") from None
    missing = [key for key in ("points", "k", "step", "eval_seed") if key not in raw]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)}: not an episode file of this version")
    points = raw["points"].astype(np.float64)
    out: dict[str, Any] = {"step": int(raw["step"]), "eval_seed": int(raw["eval_seed"]), "points": points,
                           "k": raw["k"].astype(np.int64)}
    for key, value in raw.items():
        if key.startswith("errors_"):
            out[f"err_{key[7:]}"] = value.astype(np.float64) / _per_episode(np.maximum(points, 1), value.ndim)
        elif key.startswith("loss_"):
            out[key] = value.astype(np.float64)
    lengths = {key: len(value) for key, value in out.items() if isinstance(value, np.ndarray)}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"{path}: arrays of different lengths {lengths}")
    return out


# ------------------------------------------------------------------------------------------- checkpoints
def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_path(run_dir: str | os.PathLike, which: str) -> Path:
    """checkpoints/last.ckpt or checkpoints/best.ckpt (which: "last" | "best")."""
    if which not in ("best", "last"):
        raise ConfigError(f"which: expected 'best' or 'last', got {which!r}")
    return checkpoint_dir(run_dir) / (BEST if which == "best" else LAST)


def best_or_last_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """best.ckpt when there is one, else last.ckpt, else None."""
    for which in ("best", "last"):
        path = checkpoint_path(run_dir, which)
        if path.exists():
            return path
    return None


def checkpoints_present(run_dir: str | os.PathLike) -> list[str]:
    folder = checkpoint_dir(run_dir)
    return sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []


def looks_like_run_dir(path: str | os.PathLike) -> bool:
    """A run directory (checkpoints/ or config.yaml), not a DeepSpeed checkpoint directory (`latest`)."""
    path = Path(path)
    return path.is_dir() and (checkpoint_dir(path).is_dir() or config_path(path).is_file()) \
        and not (path / "latest").is_file()


def curves_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CURVES


# ------------------------------------------------------------------------------------------- sweep dir
def index_path(sweep_dir: str | os.PathLike) -> Path:
    return Path(sweep_dir) / INDEX


def spec_path(sweep_dir: str | os.PathLike) -> Path:
    return Path(sweep_dir) / SWEEP_SPEC


def write_index(sweep_dir: str | os.PathLike, name: str, points: list[dict[str, Any]]) -> None:
    atomic_write_json(index_path(sweep_dir), {"name": name, "points": points})


def read_index(sweep_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The points of index.json as the sweep command wrote them; ConfigError naming the file otherwise."""
    path = index_path(sweep_dir)
    try:
        return list(json.loads(path.read_text())["points"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a sweep index: {exc}") from None


def index_run_dirs(sweep_dir: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Run dirs named by index.json, accepting any of the shapes a sweep index may take (a list of paths, or
    {"points"|"runs": [...]} of entries with run_dir/dir/path/name); ([], problems) when unreadable."""
    sweep_dir = Path(sweep_dir)
    index = index_path(sweep_dir)
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


def run_dirs_on_disk(sweep_dir: str | os.PathLike) -> list[Path]:
    """Every directory below the sweep dir holding a config.yaml (wandb's and hidden folders left out)."""
    sweep_dir = Path(sweep_dir)
    return sorted({p.parent for p in sweep_dir.rglob(CONFIG) if "wandb" not in p.parts
                   and p.parent != sweep_dir and not p.parent.name.startswith(".")})


def launch_record_path(sweep_dir: str | os.PathLike, point_id: int) -> Path:
    return Path(sweep_dir) / LOCAL_LAUNCHES / f"{point_id}.json"


def read_launch_record(sweep_dir: str | os.PathLike, point_id: int) -> Optional[dict[str, Any]]:
    """The record of a point's latest local launch (pid, host, exit code), None when never launched here."""
    try:
        return json.loads(launch_record_path(sweep_dir, point_id).read_text())
    except (OSError, ValueError):
        return None


def write_launch_record(sweep_dir: str | os.PathLike, point_id: int, record: dict[str, Any]) -> None:
    atomic_write_json(launch_record_path(sweep_dir, point_id), record)


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
