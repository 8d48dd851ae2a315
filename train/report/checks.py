"""The report's checks against the theory, computed from run records (no plotting, no files).

Runs are grouped into *points* (same config up to the seeds). A check needs a *family*: points that differ
only along one axis (N, depth L, heads M or separation Δ). Each check returns the numbers its figure and
its sentence need, or None when the sweep has no such family ("not in this sweep").
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Hashable, Optional, Sequence

import numpy as np

from emformer.data.tasks import TaskSpec, anchored
from emformer.train.report import scaling
from emformer.train.report.records import SHORT_NAMES, RunRecord, point_values

SAMPLE_COMPLEXITY_BOUND = -0.5
RATE_SLOPE = -1 / 8
ORACLE_FIT_MAX_ERR = 0.1
"""separation fit: only Δ where the oracle's error is below this (the well-separated regime)"""
MIN_RESOLVED_ERRORS = 10
"""separation fit: only Δ where the model makes at least this many errors on the whole eval set"""


@dataclass
class Point:
    """Runs of one config, one per seed (complete runs only)."""

    values: dict[str, Any]
    runs: list[RunRecord]

    def final(self, key: str) -> dict[Hashable, float]:
        """seed -> that metric in the run's last val row (runs lacking it are left out)."""
        out = {}
        for run in self.runs:
            row = run.final or {}
            if isinstance(row.get(key), (int, float)) and math.isfinite(row[key]):
                out[run.seed] = float(row[key])
        return out

    def mean(self, key: str) -> float:
        values = list(self.final(key).values())
        return float(np.mean(values)) if values else math.nan

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config


def group_points(runs: Sequence[RunRecord]) -> list[Point]:
    points: dict[tuple, Point] = {}
    for run in runs:
        if not run.complete:
            continue
        key = run.point_key()
        points.setdefault(key, Point(point_values(run), [])).runs.append(run)
    return list(points.values())


def varying_keys(points: Sequence[Point]) -> list[str]:
    """Config keys whose value differs between points (what the sweep varied)."""
    keys = sorted({k for p in points for k in p.values})
    return [k for k in keys if len({repr(p.values.get(k)) for p in points}) > 1]


def label(values: dict[str, Any], keys: Sequence[str]) -> str:
    parts = []
    for key in keys:
        value = values.get(key)
        if key == "N":
            value = "∞" if value == math.inf else ("shards" if value is None else f"{int(value)}")
        parts.append(f"{SHORT_NAMES.get(key, key)}={value}")
    return ", ".join(parts) if parts else "all runs"


ALWAYS_SHOWN = ("model.depth", "model.heads", "model.width")


def family_keys(points: Sequence[Point], axis: str) -> list[str]:
    """Keys that name a family along `axis`: the model's L, M, D and whatever else the sweep varied."""
    varying = [k for k in varying_keys(points) if k != axis]
    return [k for k in ALWAYS_SHOWN if k != axis and k not in varying] + varying


def families(points: Sequence[Point], axis: str) -> list[list[Point]]:
    """Groups of points equal in everything but `axis`, with ≥ 2 distinct values of it, largest first."""
    groups: dict[str, list[Point]] = {}
    for point in points:
        rest = {k: v for k, v in point.values.items() if k != axis}
        groups.setdefault(json.dumps(rest, sort_keys=True, default=repr), []).append(point)
    qualifying = [g for g in groups.values() if len({repr(p.values.get(axis)) for p in g}) >= 2]
    return sorted(qualifying, key=lambda g: -len(g))


def _table(points: Sequence[Point], axis: str, key: str) -> dict[float, dict[Hashable, float]]:
    return {float(p.values[axis]): p.final(key) for p in points if p.final(key)}


# --------------------------------------------------------------------------- sample complexity (§3)
@dataclass
class SampleComplexity:
    family: str
    sizes: list[float]
    """finite N, ascending"""
    excess: dict[float, dict[Hashable, float]]
    """N -> seed -> test loss_N − test loss_∞ (this seed's fresh run, else the mean fresh loss)"""
    gap: dict[float, dict[Hashable, float]]
    """N -> seed -> test loss − train loss (final val row)"""
    fresh_loss: dict[Hashable, float]
    fresh_gap: float
    loss_minus_oracle: dict[float, float]
    err_minus_oracle: dict[float, float]
    """N (∞ included) -> seed-mean"""
    init_loss: float
    init_loss_rule: str
    memorised: list[float]
    fitted: list[float]
    not_positive: list[float]
    """N with seed-mean excess ≤ 0: no logarithm, left out of the fit"""
    excess_fit: scaling.Interval
    gap_fit: scaling.Interval
    gap_fitted: list[float] = field(default_factory=list)
    """N whose seed-mean gap exceeds the fresh run's |gap| (the noise floor): the gap fit's points"""
    excess_intercept: float = math.nan
    gap_intercept: float = math.nan
    seeds: int = 0
    other_families: int = 0

    @property
    def excess_verdict(self) -> str:
        return scaling.verdict(self.excess_fit, SAMPLE_COMPLEXITY_BOUND)

    @property
    def gap_verdict(self) -> str:
        return scaling.verdict(self.gap_fit, SAMPLE_COMPLEXITY_BOUND)


@lru_cache(maxsize=32)
def _init_only_loss_cached(task_json: str, seed: int, episodes: int) -> float:
    # torch (~2 s of CPU to import): only this check needs episodes; the rest of the report stays without it.
    import torch

    from emformer.data.episodes import sample_episodes

    spec = TaskSpec(**json.loads(task_json))
    losses = []
    for start in range(0, episodes, 256):
        batch = sample_episodes(spec, seed, range(start, min(episodes, start + 256)))
        points, init, sigma = batch["points"].double(), batch["init"].double(), batch["sigma"].double()
        logits = -torch.cdist(points, init).pow(2) / (2 * sigma[:, None, None] ** 2)
        logits = logits.masked_fill(~batch["kmask"][:, None, :], -math.inf)
        log_post = logits.log_softmax(-1)
        labels, mask = batch["labels"].clamp_min(0), batch["mask"]
        nll = -log_post.gather(-1, labels[..., None])[..., 0]
        per_episode = (nll * mask).sum(1) / mask.sum(1).clamp_min(1)
        losses.append(per_episode)
    return float(torch.cat(losses).mean())


def init_only_loss(config: dict[str, Any]) -> tuple[float, str]:
    """Test loss of the init alone: the posterior from the initial centroids with the true σ and equal
    weights, on the run's eval set (eval.seed, eval.episodes). Without an init, log k (a uniform guess)."""
    task = dict(config.get("task", {}))
    ev = config.get("eval", {})
    if not anchored(task.get("init", "noisy_truth")):
        k = task.get("k_max") or task.get("k", 2)
        return math.log(k), "log k (uniform guess; the task has no init)"
    try:
        value = _init_only_loss_cached(json.dumps(task, sort_keys=True), int(ev.get("seed", 1_000_003)),
                                       int(ev.get("episodes", 512)))
    except Exception as exc:  # the report must still build; say what was used instead
        k = task.get("k_max") or task.get("k", 2)
        return math.log(k), f"log k (could not compute the init-only loss: {exc})"
    return value, "init-only loss (posterior of the initial centroids with the true σ, same eval set)"


def sample_complexity(points: Sequence[Point]) -> Optional[SampleComplexity]:
    candidates = []
    for family in families(points, "N"):
        finite = [p for p in family if p.values["N"] is not None and math.isfinite(p.values["N"])]
        fresh = [p for p in family if p.values["N"] == math.inf]
        if len(finite) >= 2 and fresh:
            candidates.append((family, finite, fresh[0]))
    if not candidates:
        return None
    candidates.sort(key=lambda c: -len(c[1]))
    family, finite, fresh = candidates[0]
    finite.sort(key=lambda p: p.values["N"])
    sizes = [float(p.values["N"]) for p in finite]
    fresh_loss = fresh.final("loss")
    fresh_mean = float(np.mean(list(fresh_loss.values())))
    init_loss, init_rule = init_only_loss(fresh.config)

    # memorisation region: every N up to the largest N whose seed-mean test loss is no better than the init
    worse = [float(p.values["N"]) for p in finite if p.mean("loss") >= init_loss]
    memorised = [n for n in sizes if worse and n <= max(worse)]
    excess = {float(p.values["N"]): {s: v - fresh_loss.get(s, fresh_mean) for s, v in p.final("loss").items()}
              for p in finite}
    gap = {}
    for p in finite:
        test, train = p.final("loss"), p.final("train_loss")
        gap[float(p.values["N"])] = {s: test[s] - train[s] for s in test if s in train}
    fresh_test, fresh_train = fresh.final("loss"), fresh.final("train_loss")
    fresh_gaps = [fresh_test[s] - fresh_train[s] for s in fresh_test if s in fresh_train]

    fit_sizes = [n for n in sizes if n not in memorised]
    not_positive = [n for n in fit_sizes if excess[n] and np.mean(list(excess[n].values())) <= 0]
    pool_loss = {n: {s: v for s, v in p.final("loss").items()} for n, p in zip(sizes, finite) if n in fit_sizes}
    excess_fit = scaling.excess_power_law_interval(pool_loss, fresh_loss) if len(fit_sizes) >= 2 else scaling.NO_INTERVAL
    # The fresh run's own test − train gap is pure sampling noise (two finite episode sets, no memorisation):
    # a pool gap below it says nothing about N, and its logarithm would steepen the fit at will.
    gap_floor = abs(float(np.mean(fresh_gaps))) if fresh_gaps else 0.0
    gap_fit_values = {n: gap[n] for n in fit_sizes if gap[n] and np.mean(list(gap[n].values())) > gap_floor}
    gap_fit = scaling.power_law_interval(gap_fit_values) if len(gap_fit_values) >= 2 else scaling.NO_INTERVAL

    every = [*finite, fresh]
    result = SampleComplexity(
        family=label(fresh.values, family_keys(points, "N")),
        sizes=sizes, excess=excess, gap=gap, fresh_loss=fresh_loss,
        fresh_gap=float(np.mean(fresh_gaps)) if fresh_gaps else math.nan,
        loss_minus_oracle={float(p.values["N"]): p.mean("loss") - p.mean("loss_oracle") for p in every},
        err_minus_oracle={float(p.values["N"]): p.mean("err") - p.mean("err_oracle") for p in every},
        init_loss=init_loss, init_loss_rule=init_rule, memorised=memorised, fitted=fit_sizes,
        not_positive=not_positive, excess_fit=excess_fit, gap_fit=gap_fit, gap_fitted=sorted(gap_fit_values),
        seeds=len({s for p in every for s in p.final("loss")}), other_families=len(candidates) - 1,
    )
    result.excess_intercept = _intercept({n: excess[n] for n in fit_sizes}, excess_fit)
    result.gap_intercept = _intercept(gap_fit_values, gap_fit)
    return result


def _intercept(values: dict[float, dict[Hashable, float]], fit: scaling.Interval) -> float:
    """log-log intercept at the point-estimate slope, through the seed-mean points (for drawing the fit)."""
    if not fit.ok:
        return math.nan
    pts = [(n, np.mean(list(v.values()))) for n, v in values.items() if v]
    pts = [(n, y) for n, y in pts if y > 0]
    if not pts:
        return math.nan
    return float(np.mean([math.log(y) - fit.estimate * math.log(n) for n, y in pts]))


# --------------------------------------------------------------------------- depth and heads
@dataclass
class AxisTrend:
    axis: str
    """model.depth or model.heads"""
    family: str
    at_n: str
    xs: list[float]
    err: dict[float, float]
    err_seeds: dict[float, dict[Hashable, float]]
    err_em_depth: dict[float, float]
    err_em: float
    err_oracle: float
    fit: scaling.Interval

    @property
    def verdict(self) -> str:
        return scaling.verdict(self.fit, 0.0, strict=True)


def axis_trends(points: Sequence[Point], axis: str) -> list[AxisTrend]:
    """err against `axis` at the largest N in the sweep, one trend per family (e.g. per number of heads)."""
    sizes = [p.values.get("N") for p in points if p.values.get("N") is not None]
    largest = max(sizes) if sizes else None
    at_largest = [p for p in points if p.values.get("N") == largest]
    trends = []
    others = family_keys(at_largest, axis)
    for family in families(at_largest, axis):
        family.sort(key=lambda p: p.values[axis])
        xs = [float(p.values[axis]) for p in family]
        err_seeds = _table(family, axis, "err")
        trends.append(AxisTrend(
            axis=axis, family=label(family[0].values, others),
            at_n=label({"N": largest}, ["N"]),
            xs=xs, err={x: float(np.mean(list(v.values()))) for x, v in err_seeds.items()}, err_seeds=err_seeds,
            err_em_depth={float(p.values[axis]): p.mean("err_em_depth") for p in family},
            err_em=float(np.nanmean([p.mean("err_em") for p in family])),
            err_oracle=float(np.nanmean([p.mean("err_oracle") for p in family])),
            fit=scaling.per_doubling_interval(err_seeds),
        ))
    return trends


# --------------------------------------------------------------------------- separation (minimax rate)
@dataclass
class SeparationTrend:
    family: str
    deltas: list[float]
    err: dict[str, dict[float, float]]
    """method (model, em, lloyd, oracle) -> Δ -> seed-mean err"""
    fitted: list[float]
    excluded: dict[float, str]
    fit: scaling.Interval
    oracle_slope: float

    @property
    def verdict(self) -> str:
        return scaling.verdict(self.fit, RATE_SLOPE)

    def ratio(self, method: str, delta: float) -> float:
        oracle = self.err["oracle"].get(delta, math.nan)
        return self.err[method].get(delta, math.nan) / oracle if oracle > 0 else math.nan


METHOD_KEYS = {"model": "err", "em": "err_em", "lloyd": "err_lloyd", "oracle": "err_oracle"}


def separation_trends(points: Sequence[Point]) -> list[SeparationTrend]:
    trends = []
    for family in families(points, "task.separation"):
        family.sort(key=lambda p: p.values["task.separation"])
        deltas = [float(p.values["task.separation"]) for p in family]
        err = {m: {float(p.values["task.separation"]): p.mean(k) for p in family} for m, k in METHOD_KEYS.items()}
        excluded: dict[float, str] = {}
        for p, delta in zip(family, deltas):
            task, ev = p.config.get("task", {}), p.config.get("eval", {})
            resolution = MIN_RESOLVED_ERRORS / (ev.get("episodes", 512) * task.get("n", 128))
            if not err["oracle"][delta] < ORACLE_FIT_MAX_ERR:
                excluded[delta] = f"oracle err {err['oracle'][delta]:.3g} ≥ {ORACLE_FIT_MAX_ERR} (not well separated)"
            elif not err["model"][delta] >= resolution:
                excluded[delta] = f"model err {err['model'][delta]:.2g} < {MIN_RESOLVED_ERRORS} errors on the eval set"
        fitted = [d for d in deltas if d not in excluded]
        table = {d: p.final("err") for p, d in zip(family, deltas) if d in fitted}
        fit = scaling.squared_rate_interval(table) if len(fitted) >= 2 else scaling.NO_INTERVAL
        oracle = scaling.line_slope([d * d for d in fitted if err["oracle"][d] > 0],
                                    [math.log(err["oracle"][d]) for d in fitted if err["oracle"][d] > 0])
        others = family_keys(points, "task.separation")
        trends.append(SeparationTrend(label(family[0].values, others), deltas, err, fitted, excluded, fit,
                                      oracle[0] if oracle else math.nan))
    return trends


# --------------------------------------------------------------------------- beyond the theory

def outside_theory(values: dict[str, Any]) -> list[str]:
    """Which of the theory's assumptions a point breaks (empty: inside the theory)."""
    broken = []
    if "task.init" in values and not anchored(values["task.init"]):
        broken.append("no init")
    if values.get("task.weights", "uniform") != "uniform":
        broken.append(f"{values['task.weights']} weights")
    if values.get("task.noise", "isotropic") != "isotropic":
        broken.append(f"{values['task.noise']} noise")
    return broken


@dataclass
class SettingRow:
    setting: str
    outside: list[str]
    seeds: int
    err: float
    err_em: float
    err_lloyd: float
    err_oracle: float
    difference: scaling.Interval
    """err − err_em, mean over seeds, bootstrap over seeds"""

    @property
    def beats_em(self) -> str:
        if not self.difference.ok:
            return "yes" if self.err < self.err_em else "no"  # one seed: no interval, the sign alone
        if self.difference.high < 0:
            return "yes"
        if self.difference.low > 0:
            return "no"
        return "tie (interval straddles 0)"


def _setting_row(name: str, outside: list[str], table: dict[str, dict[Hashable, float]]) -> SettingRow:
    """table: metric (err, err_em, err_lloyd, err_oracle) -> seed -> value."""
    err, em = table.get("err", {}), table.get("err_em", {})
    seeds = [s for s in err if s in em]
    difference = scaling.bootstrap(lambda sample: float(np.mean([err[s] - em[s] for s in sample])), seeds) \
        if len(seeds) >= 2 else scaling.NO_INTERVAL
    mean = lambda key: float(np.mean(list(table[key].values()))) if table.get(key) else math.nan  # noqa: E731
    return SettingRow(name, outside, len(seeds), mean("err"), mean("err_em"), mean("err_lloyd"), mean("err_oracle"),
                      difference)


def beyond_theory(points: Sequence[Point], shifted: Sequence[Any] = ()) -> Optional[list[SettingRow]]:
    """Model err against EM err per setting, when some point of the sweep is outside the theory or the
    report evaluated runs at test time on a shifted task (`shifted`: shift.ShiftResult per run)."""
    if not any(outside_theory(p.values) for p in points) and not shifted:
        return None
    keys = varying_keys(points)  # every key that tells the points apart, so no two rows share a name
    metrics = ("err", "err_em", "err_lloyd", "err_oracle")
    rows = [_setting_row(label(p.values, keys), outside_theory(p.values), {m: p.final(m) for m in metrics})
            for p in points]
    by_run = {}
    for result in shifted:
        if result.metrics:
            by_run.setdefault(result.shift, {})[result.run_dir.resolve()] = result.metrics
    for shift, results in by_run.items():
        for p in points:
            runs = [r for r in p.runs if r.path.resolve() in results]
            if not runs:
                continue
            table = {m: {r.seed: results[r.path.resolve()][m] for r in runs} for m in metrics}
            rows.append(_setting_row(f"{label(p.values, keys)}; {shift.label}",
                                     [*outside_theory(p.values), f"{shift.label} (trained on another task)"], table))
    return sorted(rows, key=lambda r: (bool(r.outside), r.setting))
