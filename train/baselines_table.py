"""`emformer baselines CONFIG [key=val...]`: how well EM, Lloyd and the oracle cluster a task.

Samples `--episodes` episodes of the config's task (seed `--seed`, default eval.seed: the eval set the
model is scored on) and prints, per method, the permutation-minimised error, the anchored error, ARI,
cross-entropy and the matched mean error ‖μ̂ − μ‖/σ, each with its standard error over episodes. EM and Lloyd
start from the task's init, then again from k-means++ and spectral centroids computed on the same points
(their own per-episode uniforms). For two equal-weight isotropic clusters the oracle's closed form Φ(−Δ/2)
is shown beside it. `--json` prints one JSON object instead. Light: no lightning import.
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Callable

import torch

from emformer.data import inits
from emformer.data.episodes import sample_episodes
from emformer.data.tasks import TaskSpec
from emformer.errors import ConfigError
from emformer.models import baselines, metrics
from emformer.models.losses import per_episode_cross_entropy
from emformer.train.cli import add_config_arguments
from emformer.train.config import load_run_config

EXTRA_INITS = inits.POINT_INITS  # each with its own uniforms stream, numbered by position from 1
COLUMNS = ("err", "err_anchored", "ari", "ce", "mean_err")
# Spectral init holds an n×n float64 matrix per episode: cap a batch at ~2e7 of its entries.
_BATCH_ENTRIES = 20_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, required=True)
    parser.add_argument("--episodes", type=int, default=1000, help="episodes to evaluate (default 1000)")
    parser.add_argument("--seed", type=int, default=None, help="episode seed (default: the config's eval.seed)")
    parser.add_argument("--em-iters", type=int, default=None,
                        help="EM and Lloyd iterations (default: the config's eval.em_iters)")
    parser.add_argument("--batch-size", type=int, default=None, help="episodes per batch (default: by n)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def closed_form_oracle_error(spec: TaskSpec, separation: torch.Tensor) -> float | None:
    """Φ(−Δ/2) (averaged over the episodes' Δ) when it is exact: k = 2, equal weights, isotropic noise."""
    if spec.k != 2 or spec.k_max not in (None, 2) or spec.weights != "uniform" or spec.noise != "isotropic":
        return None
    return float((0.5 * torch.erfc(separation.double() / 2 / math.sqrt(2))).mean())


def _matched_log_resp(log_resp: torch.Tensor, pred: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Columns reordered so column j is the predicted cluster matched to true label j (for CE without anchors)."""
    perm = metrics.best_label_permutation(pred, labels, mask, log_resp.shape[-1])
    return torch.gather(log_resp, 2, perm[:, None, :].expand_as(log_resp))


class _Rows:
    """Per-episode values of every (method, metric), concatenated over batches."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, list[torch.Tensor]]] = {}

    def add(self, method: str, **columns: torch.Tensor) -> None:
        row = self.values.setdefault(method, {})
        for name, value in columns.items():
            row.setdefault(name, []).append(value.double())

    def summary(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for method, row in self.values.items():
            out[method] = {}
            for name in COLUMNS:
                if name not in row:
                    continue
                values = torch.cat(row[name])
                out[method][name] = float(values.mean())
                out[method][f"{name}_se"] = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0
        return out


def _score_clustering(rows: _Rows, method: str, batch: dict[str, torch.Tensor], pred: torch.Tensor,
                      centroids: torch.Tensor, log_resp: torch.Tensor | None, anchored: bool) -> None:
    labels, mask, kmask = batch["labels"], batch["mask"], batch["kmask"]
    k = kmask.shape[1]
    columns = {
        "err": metrics.misclustering_rate(pred, labels, mask, k),
        "ari": metrics.adjusted_rand_index(pred, labels, mask, k),
        "mean_err": metrics.matched_mean_error(centroids, batch["means"], kmask, batch["sigma"]),
    }
    if anchored:
        columns["err_anchored"] = metrics.anchored_error(pred, labels, mask)
    if log_resp is not None:
        logits = log_resp if anchored else _matched_log_resp(log_resp, pred, labels, mask)
        columns["ce"] = per_episode_cross_entropy(logits, labels, mask, dtype=torch.float64)
    rows.add(method, **columns)


def evaluate(spec: TaskSpec, seed: int, episodes: int, em_iters: int, batch_size: int,
             progress: Callable[[int], None] | None = None) -> dict[str, object]:
    """The table as a dict {method: {metric: mean, metric_se: standard error}} plus "meta"."""
    rows = _Rows()
    covariance = baselines.em_covariance(spec)
    separations = []
    for start in range(0, episodes, batch_size):
        batch = sample_episodes(spec, seed, range(start, min(start + batch_size, episodes)))
        points, mask, kmask, labels = batch["points"], batch["mask"], batch["kmask"], batch["labels"]
        separations.append(batch["separation"])

        log_post = baselines.oracle_log_posterior(batch, spec)
        pred = log_post.argmax(-1)
        rows.add("oracle", err=metrics.misclustering_rate(pred, labels, mask, kmask.shape[1]),
                 err_anchored=metrics.anchored_error(pred, labels, mask),
                 ari=metrics.adjusted_rand_index(pred, labels, mask, kmask.shape[1]),
                 ce=per_episode_cross_entropy(log_post, labels, mask, dtype=torch.float64))

        starts = {"": baselines.baseline_init(batch, spec)}
        for stream, name in enumerate(EXTRA_INITS, start=1):
            if name == spec.init:
                continue  # already the task's own init
            uniforms = baselines.episode_uniforms(batch, kmask.shape[1], stream)
            starts[f"[{name}]"] = inits.initial_centroids(name, inits.InitInputs(points, mask, kmask, uniforms))
        for suffix, init in starts.items():
            anchored = spec.anchored and suffix == ""
            fit = baselines.em(points, mask, kmask, init, em_iters, covariance)
            _score_clustering(rows, f"em{suffix}", batch, fit.log_resp.argmax(-1), fit.means, fit.log_resp, anchored)
            centroids, lloyd_labels = baselines.lloyd(points, mask, kmask, init, em_iters)
            _score_clustering(rows, f"lloyd{suffix}", batch, lloyd_labels, centroids, None, anchored)
        if progress is not None:
            progress(min(start + batch_size, episodes))

    table: dict[str, object] = dict(rows.summary())
    closed = closed_form_oracle_error(spec, torch.cat(separations))
    if closed is not None:
        table["oracle"]["closed_form"] = closed  # type: ignore[index]
    table["meta"] = {
        "task": spec.to_dict(), "episodes": episodes, "seed": seed, "em_iters": em_iters,
        "em_covariance": covariance, "em_init": spec.init if spec.anchored else "kmeans++",
    }
    return table


def _fmt(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "—"
    return f"{value:.5f} ± {se:.5f}" if se is not None else f"{value:.4f}"


def format_table(table: dict[str, object]) -> str:
    meta = table["meta"]
    task = meta["task"]  # type: ignore[index]
    delta = task["separation"] if task["separation_max"] is None else f"{task['separation']}..{task['separation_max']}"
    k = task["k"] if task["k_max"] is None else f"{task['k']}..{task['k_max']}"
    n = task["n"] if task["n_max"] is None else f"{task['n']}..{task['n_max']}"
    lines = [
        f"task: k={k} d={task['d']} n={n} Δ={delta} noise={task['noise']} weights={task['weights']} "
        f"init={task['init']} · {meta['episodes']} episodes, seed {meta['seed']} · "  # type: ignore[index]
        f"EM ({meta['em_covariance']}) and Lloyd: {meta['em_iters']} iterations",  # type: ignore[index]
        "",
        f"{'method':<17} {'err':>19} {'err (anchored)':>19} {'ARI':>8} {'CE':>8} {'‖μ̂−μ‖/σ':>9}",
    ]
    for method, row in table.items():
        if method == "meta":
            continue
        get = row.get  # type: ignore[union-attr]
        lines.append(
            f"{method:<17} {_fmt(get('err'), get('err_se')):>19} "
            f"{_fmt(get('err_anchored'), get('err_anchored_se')) if 'err_anchored' in row else '—':>19} "
            f"{_fmt(get('ari')):>8} {_fmt(get('ce')):>8} {_fmt(get('mean_err')):>9}")
    oracle = table["oracle"]
    if "closed_form" in oracle:  # type: ignore[operator]
        lines.append(f"{'  closed form':<17} {oracle['closed_form']:>19.5f}   Φ(−Δ/2): two equal isotropic clusters")  # type: ignore[index]
    em_err, oracle_err = table["em"]["err"], oracle["err"]  # type: ignore[index]
    if oracle_err > 0:
        lines.append(f"\nEM / oracle err: {em_err / oracle_err:.2f}×")
    lines.append("err: permutation-minimised mis-clustering rate ± standard error over episodes; anchored: "
                 "labels as matched to the task's init; CE: cross-entropy of the posterior (rows [init]: "
                 "after matching labels); ‖μ̂−μ‖/σ: matched mean error.")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.overrides)
    spec = cfg.task
    if args.episodes < 1:
        raise ConfigError(f"--episodes: expected an integer >= 1, got {args.episodes}")
    em_iters = cfg.eval.em_iters if args.em_iters is None else args.em_iters
    if em_iters < 1:
        raise ConfigError(f"--em-iters: expected an integer >= 1, got {em_iters}")
    seed = cfg.eval.seed if args.seed is None else args.seed
    if seed < 0:
        raise ConfigError(f"--seed: expected an integer >= 0, got {seed}")
    batch_size = args.batch_size or max(1, min(250, _BATCH_ENTRIES // (spec.n_pad ** 2)))
    if batch_size < 1:
        raise ConfigError(f"--batch-size: expected an integer >= 1, got {batch_size}")
    table = evaluate(spec, seed, args.episodes, em_iters, batch_size)
    print(json.dumps(table) if args.json else format_table(table))
    return 0
