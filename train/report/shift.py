"""Test-time shifts for the report: a trained run evaluated on a task it was not trained on (other k, n, Δ ...).

The training loop evaluates each run on its own task only. `emformer report SWEEP --test-shift task.n=128`
loads each complete run's best checkpoint (last if there is none), draws the run's test set (eval.test_seed,
eval.episodes; the checkpoint was selected on the eval set) from the run's task with the shift applied, and scores the model, EM (eval.em_iters iterations,
same init), Lloyd and the oracle on it. The model has no positional encoding and reads the initial centroids
as tokens, so n and (with an init) k may change freely; d may not (the input embedding is d wide), nor k
without an init (the learned centroid slots are k_max of them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from emformer.data.tasks import TaskSpec
from emformer.errors import ConfigError, EmformerError
from emformer.train import rundir
from emformer.train.config import to_run_config
from emformer.train.scoring import held_out_test_seed, score_model

SHIFTABLE = ("k", "k_max", "n", "n_max", "separation", "separation_max", "weights", "weights_alpha", "weights_lo",
             "weights_hi", "noise", "noise_df", "diag_ratio", "init_noise")


@dataclass(frozen=True)
class Shift:
    """One test-time setting: task keys and the values they take at test time."""

    values: tuple[tuple[str, Any], ...]

    @property
    def label(self) -> str:
        return "test " + ", ".join(f"{k}={v}" for k, v in self.values)

    def apply(self, task: dict[str, Any]) -> dict[str, Any]:
        return {**task, **dict(self.values)}


def parse_shift(text: str) -> Shift:
    """`task.n=128` or `task.k=3,task.n=32` (one setting; give --test-shift again for another)."""
    import yaml

    values = []
    for item in text.split(","):
        key, sep, raw = item.strip().partition("=")
        name = key.removeprefix("task.")
        if not sep or not key.startswith("task.") or name not in SHIFTABLE:
            raise ConfigError(f"--test-shift '{text}': expected task.KEY=VALUE[,task.KEY=VALUE], KEY one of "
                              f"{', '.join(SHIFTABLE)}; got '{item}'")
        values.append((name, yaml.safe_load(raw)))
    return Shift(tuple(values))


@dataclass
class ShiftResult:
    run_dir: Path
    shift: Shift
    metrics: dict[str, float] = field(default_factory=dict)
    """err, loss, err_em, err_lloyd, err_oracle on the shifted eval set (empty if it failed)"""
    problem: str = ""


def _checkpoint(run_dir: Path) -> Path:
    path = rundir.best_or_last_checkpoint(run_dir)
    if path is not None:
        return path
    raise ConfigError(f"{run_dir}: no checkpoints/best.ckpt or last.ckpt to evaluate at test time")


def evaluate_shift(run_dir: Path, shift: Shift, config: dict[str, Any]) -> ShiftResult:
    """The run's model and the baselines on its test set (eval.test_seed) drawn from the shifted task: what is
    reported after selection is never scored on the episodes the checkpoint was selected on."""
    # torch and the models (~2 s of CPU to import): only `report --test-shift` evaluates models.
    from emformer.models.transformer import ClusterTransformer, TransformerConfig
    from emformer.train.checkpoints import load_checkpoint

    result = ShiftResult(run_dir, shift)
    try:
        loaded = load_checkpoint(_checkpoint(run_dir))
        run = to_run_config(loaded.run_config, f"{run_dir}: config")
        trained = run.task.validate(f"{run_dir}: task")
        spec = TaskSpec.from_dict(shift.apply(trained.to_dict()), f"--test-shift {shift.label}").validate()
        if spec.d_pad != trained.d_pad:
            raise ConfigError(f"{shift.label}: the model reads {trained.d_pad}-d points, the shifted task has {spec.d_pad}")
        if not spec.anchored and spec.k_pad != trained.k_pad:
            raise ConfigError(f"{shift.label}: without an init the model has {trained.k_pad} learned centroid slots; "
                              f"the shifted task needs {spec.k_pad}")
        model = ClusterTransformer(TransformerConfig.from_task_and_model(run.task, run.model))
        model.load_state_dict(loaded.state_dict)
        model.eval()
        result.metrics = score_model(model, spec, run.eval, held_out_test_seed(run))
    except (EmformerError, RuntimeError, ValueError, KeyError) as exc:  # one bad run must not sink the report
        result.problem = f"{run_dir}: {shift.label}: {type(exc).__name__}: {exc}"
        result.metrics = {}
    if any(not math.isfinite(v) for k, v in result.metrics.items() if k != "err_minus_em_se"):
        result.problem = f"{run_dir}: {shift.label}: non-finite metric {result.metrics}"
    return result


def evaluate_shifts(runs: Sequence[Any], shifts: Sequence[Shift]) -> list[ShiftResult]:
    """Every complete run under every shift (run records from records.read_sweep)."""
    return [evaluate_shift(run.path, shift, run.config) for shift in shifts for run in runs if run.complete]
