"""What every benchmark script shares: the machine description, markdown tables, timing, progress output,
the reference model cache, and the atomic rewrite of BENCHMARKS.md.

Benchmarks import only torch / numpy / the light emformer modules at top level; lightning is imported by
the training subprocesses, never here.
"""
from __future__ import annotations

import json
import re
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from emformer.train import rundir

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / ".cache"
NO_GPU = "no GPU on this machine"


# ------------------------------------------------------------------------------------------ progress
_START = time.perf_counter()


def progress(message: str) -> None:
    """One line on stderr with the seconds since the benchmarks started (stdout stays for tables)."""
    print(f"[bench {time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ the machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _version(name: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def usable_cpus() -> int:
    from emformer.train.strategies import usable_cores  # torch: imported when a benchmark asks

    return usable_cores()


def gpu_description() -> Optional[str]:
    import torch

    if not torch.cuda.is_available():
        return None
    return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))


def load_average() -> Optional[float]:
    """The 1-minute load average; None where the OS has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "cpu": _cpu_model(), "cpus_usable": usable_cpus(), "cpus_total": os.cpu_count(),
        "memory_gib": _memory_gib(), "gpu": gpu_description(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "numpy": _version("numpy"), "scikit-learn": _version("scikit-learn"), "lightning": _version("lightning"),
        "git_commit": git_commit(), "load_avg_1m": load_average(),
    }


def machine_markdown(info: dict[str, Any], load_end: Optional[float] = None) -> str:
    memory = f"{info['memory_gib']:.0f} GiB" if info.get("memory_gib") else "unknown"
    lines = [
        f"- CPU: {info['cpu']}, {info['cpus_usable']} usable core(s) of {info['cpus_total']}; memory {memory}",
        f"- GPU: {info['gpu'] or NO_GPU}",
        f"- {info['platform']}; Python {info['python']}, torch {info['torch']} "
        f"({info['torch_threads']} intra-op threads), numpy {info['numpy']}, scikit-learn {info['scikit-learn']}, "
        f"lightning {info['lightning']}",
        f"- code: git {info['git_commit'] or 'unknown'}",
    ]
    if info.get("load_avg_1m") is not None:
        load = f"{info['load_avg_1m']:.2f} at the start" + (f", {load_end:.2f} at the end" if load_end is not None else "")
        busy = max(info["load_avg_1m"], load_end or 0.0) > info["cpus_usable"] + 0.5
        lines.append(f"- load average (1 min): {load}" + (
            " — **the machine was busy: wall-clock figures below are inflated**" if busy else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ tables
def fmt(value: Any, digits: int = 3) -> str:
    """Numbers to `digits` significant figures (integers as is); None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != value:  # NaN
        return "—"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}" if magnitude >= 1e-3 else f"{value:.2e}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: Optional[str] = None) -> str:
    """A GitHub markdown table. `align`: one letter per column, l or r (default: first l, the rest r)."""
    header = list(header)
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"align has {len(align)} letters for {len(header)} columns")
    body = [[cell if isinstance(cell, str) else fmt(cell) for cell in row] for row in rows]
    for row in body:
        if len(row) != len(header):
            raise ValueError(f"row {row} has {len(row)} cells for {len(header)} columns")
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    """Best and median wall seconds over repeats (best is the least disturbed by other processes)."""

    seconds: list[float] = field(default_factory=list)
    output: Any = None
    """what the warm-up call returned (so callers can score it without another call)"""

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        ordered = sorted(self.seconds)
        return ordered[len(ordered) // 2]


def time_call(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> Timing:
    timing = Timing()
    for _ in range(warmup):
        timing.output = fn()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        timing.seconds.append(time.perf_counter() - start)
    return timing


# ------------------------------------------------------------------------------------------ subprocesses
def subprocess_env(threads: Optional[int] = None) -> dict[str, str]:
    """Environment of benchmark subprocesses: no wandb network, unbuffered, optional thread cap."""
    env = dict(os.environ)
    env.update(WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def emformer_command(*args: str) -> list[str]:
    """`emformer ARGS` run with this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "emformer", *args]


def run_checked(command: list[str], what: str, timeout: float, env: Optional[dict[str, str]] = None,
                quiet: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=env or subprocess_env(), timeout=timeout, text=True,
                            capture_output=quiet)
    if result.returncode != 0:
        tail = ((result.stdout or "")[-2000:] + (result.stderr or "")[-3000:]) if quiet else ""
        raise RuntimeError(f"{what} failed (exit {result.returncode}): {' '.join(command)}\n{tail}")
    return result


# ------------------------------------------------------------------------------------------ the model
@dataclass
class TrainedModel:
    """A trained run and its export, cached under benchmarks/.cache keyed by the config hash."""

    config_path: str
    overrides: list[str]
    config_hash: str
    run_dir: Path
    export_dir: Path
    trained_now: bool
    train_seconds: Optional[float]
    val: dict[str, Any]
    eval_episodes: Optional[int] = None

    def describe(self) -> str:
        command = " ".join(["emformer train", self.config_path, *self.overrides])
        how = (f"trained by this benchmark run in {self.train_seconds / 60:.1f} min" if self.trained_now
               else "reused from the benchmark cache")
        text = f"`{command}` (config hash {self.config_hash}; {how}; run dir `{_rel(self.run_dir)}`)"
        val = self.val
        if val.get("err") is not None and val.get("err_em") is not None:
            text += (f"; its final evaluation (step {val.get('step')}, {self.eval_episodes} episodes): err "
                     f"{val['err']:.4f}, EM {val['err_em']:.4f}, oracle {val.get('err_oracle', float('nan')):.4f}")
        return text


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def resolved_hash(config_path: str, overrides: Sequence[str]) -> str:
    from emformer.train.config import config_hash, load_config

    return config_hash(load_config(REPO / config_path, list(overrides)))


def trained_model(config_path: str, overrides: Sequence[str] = (), cache: Path = CACHE, reuse: Optional[Path] = None,
                  timeout: float = 3600) -> TrainedModel:
    """The cached run + export of `config_path overrides`, training (or resuming) and exporting it when absent.

    `reuse`: an existing run directory of the same config (same hash, DONE) to copy into the cache instead of
    training, e.g. one the user already trained. A different config is refused, so a cached figure always
    belongs to the config it names.
    """
    from emformer.train.config import config_hash, load_config

    cfg = load_config(REPO / config_path, list(overrides))
    digest = config_hash(cfg)
    slot = Path(cache) / f"{cfg.name}-{digest}"
    run_dir, export_dir = slot / "run", slot / "export"
    trained_now, seconds = False, None
    if reuse is not None and not rundir.is_done(run_dir):
        _copy_run(Path(reuse), run_dir, digest)
    if not rundir.is_done(run_dir):
        progress(f"training {config_path} {' '.join(overrides)} into {_rel(run_dir)} (cached for later runs)")
        start = time.perf_counter()
        command = emformer_command("train", str(REPO / config_path), *overrides, "wandb.mode=disabled",
                                   "trainer.progress=false", "--run-dir", str(run_dir))
        run_checked(command, f"training {config_path}", timeout, quiet=False)
        seconds, trained_now = time.perf_counter() - start, True
        shutil.rmtree(export_dir, ignore_errors=True)
    if not (export_dir / "config.json").is_file():
        from emformer.train.export.command import export_run

        export_run(run_dir, export_dir, which="best" if rundir.checkpoint_path(run_dir, "best").exists() else "last")
    done = rundir.read_done(run_dir)
    return TrainedModel(config_path=config_path, overrides=list(overrides), config_hash=digest, run_dir=run_dir,
                        export_dir=export_dir, trained_now=trained_now, train_seconds=seconds,
                        val=done.get("val") or {}, eval_episodes=int(cfg.eval.episodes))


def _copy_run(source: Path, run_dir: Path, digest: str) -> None:
    from omegaconf import OmegaConf

    from emformer.train.config import config_hash

    if not rundir.is_done(source):
        raise RuntimeError(f"--reuse-run {source}: not a finished run directory (no DONE file)")
    theirs = config_hash(OmegaConf.to_container(OmegaConf.load(rundir.config_path(source)), resolve=True))
    if theirs != digest:
        raise RuntimeError(f"--reuse-run {source}: config hash {theirs}, but the benchmark needs {digest}; "
                           f"train the reference config instead (or let the benchmark do it)")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = run_dir.with_name(run_dir.name + ".copying")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("wandb"))
    os.replace(staging, run_dir)
    progress(f"copied finished run {source} into the cache ({_rel(run_dir)})")


# ------------------------------------------------------------------------------------------ the report
def write_report(path: Path, text: str) -> None:
    """Rewrite BENCHMARKS.md atomically: a reader (or a crash) never sees half a file."""
    from emformer.atomic import atomic_write_text

    atomic_write_text(path, text if text.endswith("\n") else text + "\n")


# Blocks of BENCHMARKS.md that run_all.py does not measure sit between `<!-- NAME:begin -->` and
# `<!-- NAME:end -->`: the GPU proof (NAME gpu_check, written by benchmarks/gpu_check.py) and figures measured
# by hand against an older commit, which no later run can measure again. run_all.py carries every such block
# over unchanged, so `make bench` never drops them.
GPU_SECTION = "gpu_check"
_BLOCK = re.compile(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", re.S)


def kept_sections(text: str) -> dict[str, str]:
    """Every NAME:begin..NAME:end block of a BENCHMARKS.md text by NAME, markers included, in file order."""
    return {match.group(1): match.group(0) for match in _BLOCK.finditer(text)}


def replace_section(text: str, name: str, section: str) -> str:
    """`text` with its block NAME replaced by `section` (appended when there is none)."""
    old = kept_sections(text).get(name)
    if old is not None:
        return text.replace(old, section, 1)
    return text.rstrip("\n") + "\n\n" + section + "\n"


def section_markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def save_json(path: Path, obj: Any) -> None:
    from emformer.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
