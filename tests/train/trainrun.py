"""Running `emformer train` from the tests: in a subprocess (as users do; DDP re-executes the command line, and
the crash and signal hooks end the process), one thread, wandb off unless a test asks for it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "configs" / "debug.yaml"
# Fields of a metrics row that depend on the machine's speed, not on what was computed.
TIMING_KEYS = {"episodes_per_s", "tokens_per_s", "s_per_step"}


def train_command(run_dir: Path, *overrides: str, config: Path = DEBUG) -> list[str]:
    return [sys.executable, "-m", "emformer", "train", str(config), "trainer.threads=1", "wandb.mode=disabled",
            *overrides, "--run-dir", str(run_dir)]


def env(**extra: Optional[str]) -> dict[str, str]:
    """The test environment (one thread, wandb disabled) with `extra` set, or removed where None."""
    from export_fixtures import subprocess_env

    merged = {**subprocess_env(), **extra}
    return {key: value for key, value in merged.items() if value is not None}


def train(run_dir: Path, *overrides: str, config: Path = DEBUG, extra_env: Optional[dict[str, Optional[str]]] = None,
          expect: int = 0, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run to completion and check the exit code is `expect` (1 with EMFORMER_CRASH_AT_STEP: then the process
    must have ended at the hook, not on an error)."""
    result = subprocess.run(train_command(run_dir, *overrides, config=config), cwd=REPO, env=env(**(extra_env or {})),
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != expect or (expect != 0 and "Traceback" in result.stderr):
        raise AssertionError(f"emformer train exited {result.returncode}, expected {expect}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def rows(run_dir: Path, split: Optional[str] = None) -> list[dict[str, Any]]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    out = [json.loads(line) for line in lines if line.strip()]
    return [r for r in out if split is None or r["split"] == split]


def computed(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row without its timing fields."""
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def assert_same_rows(got: list[dict[str, Any]], expected: list[dict[str, Any]], rel: float = 1e-5,
                     abs_: float = 1e-6) -> None:
    """Same steps, splits and keys; every number equal to floating-point tolerance."""
    import pytest

    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in expected]
    for a, b in zip(got, expected):
        a, b = computed(a), computed(b)
        assert a.keys() == b.keys(), (a["step"], a.keys() ^ b.keys())
        for key in a:
            if isinstance(b[key], float):
                assert a[key] == pytest.approx(b[key], rel=rel, abs=abs_), (a["step"], a["split"], key)
            else:
                assert a[key] == b[key], (a["step"], a["split"], key)


def no_duplicate_steps(run_dir: Path) -> None:
    keys = [(r["step"], r["split"]) for r in rows(run_dir)]
    assert len(keys) == len(set(keys)), f"duplicated (step, split) rows in {run_dir}/metrics.jsonl"
