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
from typing import TYPE_CHECKING, Any, Hashable, Optional, Sequence

import numpy as np

from emformer.data.tasks import TaskSpec, anchored
from emformer.train.report import scaling
from emformer.train.report.records import SHORT_NAMES, RunRecord, point_values

if TYPE_CHECKING:  # shift.py evaluates checkpoints (torch); the checks only read its results
    from emformer.train.report.shift import ShiftResult

SAMPLE_COMPLEXITY_BOUND = -0.5
RATE_SLOPE = -1 / 8
ORACLE_FIT_MAX_ERR = 0.1
"""separation fit: only Δ where the oracle's error is below this (the well-separated regime)"""
MIN_RESOLVED_ERRORS = 10
"""separation fit: only Δ where the model makes at least this many errors on the whole eval set"""


def seed_mean(by_seed: dict[Hashable, float]) -> float:
    """The mean over seeds of one value (nan without any): what every seed-mean figure of the report is."""
    return float(np.mean(list(by_seed.values()))) if by_seed else math.nan


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
        return seed_mean(self.final(key))

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


# --------------------------------------------------------------------------- unfinished runs
def _rest_key(values: dict[str, Any], axis: str) -> str:
    return json.dumps({k: v for k, v in values.items() if k != axis}, sort_keys=True, default=repr)


def _diverged(run: RunRecord) -> bool:
    loss = (run.final or {}).get("loss")
    return not (isinstance(loss, (int, float)) and math.isfinite(loss))


def unfinished_members(family: Sequence[Point], runs: Sequence[RunRecord], axis: str) -> list[str]:
    """Runs that belong to this family (same config but for `axis` and the seeds) yet have no usable final
    row: never finished (no DONE) or diverged (non-finite final val loss). Named, so a check that would be
    fitted without them says so instead of passing on the survivors."""
    if not family:
        return []
    key = _rest_key(family[0].values, axis)
    named = []
    for run in runs:
        if not run.config:
            continue
        if run.complete and not _diverged(run):
            continue
        if _rest_key(point_values(run), axis) == key:
            why = "diverged: final val loss is not finite" if run.complete else (run.note or run.state)
            named.append(f"{run.name} ({why})")
    return sorted(named)


def _unless_unfinished(verdict: str, incomplete: Sequence[str]) -> str:
    return scaling.INCONCLUSIVE if incomplete and verdict != scaling.NO_DATA else verdict


# --------------------------------------------------------------------------- sample complexity (§3)
MEMORISED_TRAIN_FRACTION = 0.5
"""N is memorised when its pool's train loss is below this fraction of the fresh run's train loss"""
TRAIN_CRITERION, INIT_CRITERION, SMALLER = "train loss", "worse than the init", "smaller"
"""the memorisation criteria, as `memorisation_region` names them"""
FLOOR_SES = 2.0
"""an N enters the excess fits only when its seed-mean excess exceeds this many paired standard errors"""
MIN_FITTED_SIZES = 3


@dataclass
class SampleComplexity:
    family: str
    sizes: list[float]
    """finite N, ascending"""
    excess: dict[float, dict[Hashable, float]]
    """N -> seed -> test loss_N − test loss_∞ (this seed's fresh run, else the mean fresh loss)"""
    gap: dict[float, dict[Hashable, float]]
    """N -> seed -> test loss − train loss (final val row)"""
    loss: dict[float, dict[Hashable, float]]
    """N -> seed -> test loss (what the free-asymptote fit uses)"""
    fresh_loss: dict[Hashable, float]
    fresh_gap: float
    fresh_train_loss: float
    loss_minus_oracle: dict[float, float]
    err_minus_oracle: dict[float, float]
    """N (∞ included) -> seed-mean"""
    init_loss: float
    init_loss_rule: str
    memorised: list[float]
    memorised_by: dict[float, str]
    """memorised N -> which criterion flagged it, in words (see `memorisation_region`)"""
    fitted: list[float]
    """N outside the memorisation region whose excess clears the paired-SE floor"""
    not_positive: list[float]
    """N outside the memorisation region whose excess does not clear the floor (left out of the log fits)"""
    floor: dict[float, float]
    """N -> FLOOR_SES paired standard errors of the excess over seeds"""
    excess_fit: scaling.Interval
    upper_fit: scaling.Interval
    asymptote_fit: scaling.Interval
    gap_fit: scaling.Interval
    upper_fitted: list[float] = field(default_factory=list)
    asymptote_sizes: list[float] = field(default_factory=list)
    asymptote_params: Optional[tuple[float, float, float]] = None
    """(L_∞, a, b) fitted on the seed means"""
    gap_fitted: list[float] = field(default_factory=list)
    """N whose seed-mean gap exceeds the fresh run's |gap| (the noise floor): the gap fit's points"""
    excess_intercept: float = math.nan
    gap_intercept: float = math.nan
    seeds: int = 0
    other_families: int = 0
    incomplete: list[str] = field(default_factory=list)

    def estimates(self) -> list[tuple[str, scaling.Interval]]:
        return [("all fitted N", self.excess_fit), ("upper half of fitted N", self.upper_fit),
                ("free asymptote L_∞ + a·N^b", self.asymptote_fit)]

    @property
    def verdict_and_reason(self) -> tuple[str, str]:
        """PASS only when all three estimates pass; why not, otherwise."""
        if self.incomplete:
            return scaling.INCONCLUSIVE, f"unfinished or diverged runs in the family: {'; '.join(self.incomplete)}"
        return combined_verdict([fit for _, fit in self.estimates()], self.fitted)

    @property
    def excess_verdict(self) -> str:
        return self.verdict_and_reason[0]

    @property
    def gap_verdict(self) -> str:
        if len(self.gap_fitted) < MIN_FITTED_SIZES:
            return scaling.NO_DATA
        return _unless_unfinished(scaling.verdict(self.gap_fit, SAMPLE_COMPLEXITY_BOUND), self.incomplete)


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


def memorisation_region(train_loss: dict[float, float], test_loss: dict[float, float], fresh_train_loss: float,
                        init_loss: float) -> dict[float, str]:
    """N -> why it is in the memorisation region (no entry: outside it), from seed means.

    Two criteria, either suffices, and every N below a flagged one is in the region too:
    - train loss: the pool's train loss is below MEMORISED_TRAIN_FRACTION × the fresh run's train loss (the
      model fits its own pool far better than any model fits fresh episodes); reads train losses only.
    - worse than the init: the test loss is above the init-only loss (the posterior of the initial
      centroids, on the same eval set). A model that predicts new episodes worse than its own
      initialisation has learned its pool, not the task. This reads the test loss, but only against a fixed
      reference that no fit uses, never against the other N or a slope, so it cannot tune the cutoff to
      the fit; what it removes are the N with the largest test loss, the cliff whose drop would otherwise
      steepen the fitted slopes.
    The train criterion alone misses a pool whose train loss lands just above its cutoff while its test loss
    is already far above the init's; the second criterion catches that N."""
    flagged: dict[float, str] = {}
    for n in sorted(train_loss.keys() | test_loss.keys()):
        train, test = train_loss.get(n, math.nan), test_loss.get(n, math.nan)
        reasons = []
        if math.isfinite(fresh_train_loss) and train < MEMORISED_TRAIN_FRACTION * fresh_train_loss:
            reasons.append(f"{TRAIN_CRITERION} {train:.4g} < {MEMORISED_TRAIN_FRACTION:g} × the fresh run's "
                           f"{fresh_train_loss:.4g}")
        if math.isfinite(init_loss) and test > init_loss:
            reasons.append(f"{INIT_CRITERION}: test loss {test:.4g} > init-only loss {init_loss:.4g}")
        if reasons:
            flagged[n] = "; ".join(reasons)
    if not flagged:
        return {}
    largest = max(flagged)
    return {n: flagged.get(n, f"{SMALLER} than the memorised N = {int(largest)}")
            for n in sorted(train_loss.keys() | test_loss.keys()) if n <= largest}


def _paired_se(by_seed: dict[Hashable, float]) -> float:
    values = list(by_seed.values())
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) >= 2 else 0.0


def excess_estimates(loss: dict[float, dict[Hashable, float]], fresh_loss: dict[Hashable, float],
                     outside: Sequence[float], **kwargs) -> tuple[list[float], dict[float, float],
                                                                  tuple[scaling.Interval, ...]]:
    """(fitted N, N -> floor, (all-points, upper-half, free-asymptote) intervals of b) from test losses.

    `outside`: N outside the memorisation region. An N is fitted when its seed-mean excess over the same
    seeds' fresh runs clears FLOOR_SES paired standard errors; the log fits need ≥ MIN_FITTED_SIZES of them.
    The asymptote fit uses every N outside the region (no logarithm, so no floor needed)."""
    fresh_mean = seed_mean(fresh_loss)
    excess = {n: {s: v - fresh_loss.get(s, fresh_mean) for s, v in loss[n].items()} for n in outside}
    floor = {n: FLOOR_SES * _paired_se(excess[n]) for n in outside}
    fitted = [n for n in outside if excess[n] and seed_mean(excess[n]) > max(floor[n], 0.0)]
    none = scaling.NO_INTERVAL
    if len(fitted) < MIN_FITTED_SIZES:
        return fitted, floor, (none, none, none)
    return fitted, floor, (
        scaling.excess_power_law_interval(loss, fresh_loss, xs=fitted, **kwargs),
        scaling.excess_power_law_interval(loss, fresh_loss, xs=fitted[len(fitted) // 2:], **kwargs),
        scaling.asymptote_interval({n: loss[n] for n in outside if loss[n]}, **kwargs))


def combined_verdict(fits: Sequence[scaling.Interval], fitted: Sequence[float]) -> tuple[str, str]:
    """PASS only when the all-points, upper-half and free-asymptote estimates all pass; else why not."""
    if len(fitted) < MIN_FITTED_SIZES:
        return scaling.NO_DATA, (f"only {len(fitted)} N outside the memorisation region clear the "
                                 f"{FLOOR_SES:g}-SE floor; the fit needs ≥ {MIN_FITTED_SIZES}")
    names = ("all fitted N", "upper half of fitted N", "free asymptote L_∞ + a·N^b")
    verdicts = [(name, scaling.verdict(fit, SAMPLE_COMPLEXITY_BOUND), fit) for name, fit in zip(names, fits)]
    values = {v for _, v, _ in verdicts}
    if values == {scaling.PASS}:
        return scaling.PASS, "all three estimates pass"
    if values == {scaling.FAIL}:
        return scaling.FAIL, "all three estimates fail"
    return scaling.INCONCLUSIVE, "the estimates disagree: " + "; ".join(
        f"{n} {v}" + (f" ({fit.unidentified})" if fit.unidentified else "") for n, v, fit in verdicts)


def sample_complexity(points: Sequence[Point], runs: Sequence[RunRecord] = ()) -> Optional[SampleComplexity]:
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
    fresh_mean = seed_mean(fresh_loss)
    fresh_train = fresh.mean("train_loss")
    init_loss, init_rule = init_only_loss(fresh.config)
    loss = {float(p.values["N"]): p.final("loss") for p in finite}

    memorised_by = memorisation_region({float(p.values["N"]): p.mean("train_loss") for p in finite},
                                       {n: seed_mean(v) for n, v in loss.items()}, fresh_train, init_loss)
    memorised = sorted(memorised_by)
    excess = {n: {s: v - fresh_loss.get(s, fresh_mean) for s, v in by_seed.items()} for n, by_seed in loss.items()}
    gap = {}
    for p in finite:
        test, train = p.final("loss"), p.final("train_loss")
        gap[float(p.values["N"])] = {s: test[s] - train[s] for s in test if s in train}
    fresh_test, fresh_train_by_seed = fresh.final("loss"), fresh.final("train_loss")
    fresh_gaps = [fresh_test[s] - fresh_train_by_seed[s] for s in fresh_test if s in fresh_train_by_seed]

    outside = [n for n in sizes if n not in memorised]
    fitted, floor, (excess_fit, upper_fit, asymptote) = excess_estimates(loss, fresh_loss, outside)
    not_positive = [n for n in outside if n not in fitted]
    enough = len(fitted) >= MIN_FITTED_SIZES
    upper = fitted[len(fitted) // 2:]
    outside_loss = {n: loss[n] for n in outside if loss[n]}
    means = sorted((n, seed_mean(v)) for n, v in outside_loss.items())
    params = scaling.asymptote_fit([n for n, _ in means], [y for _, y in means]) if len(means) >= 3 else None
    # The fresh run's own test − train gap is pure sampling noise (two finite episode sets, no memorisation):
    # a pool gap below it says nothing about N, and its logarithm would steepen the fit at will.
    gap_floor = abs(float(np.mean(fresh_gaps))) if fresh_gaps else 0.0
    gap_fit_values = {n: gap[n] for n in outside if gap[n] and seed_mean(gap[n]) > gap_floor}
    gap_fit = scaling.power_law_interval(gap_fit_values) if len(gap_fit_values) >= MIN_FITTED_SIZES \
        else scaling.NO_INTERVAL

    every = [*finite, fresh]
    result = SampleComplexity(
        family=label(fresh.values, family_keys(points, "N")),
        sizes=sizes, excess=excess, gap=gap, loss=loss, fresh_loss=fresh_loss,
        fresh_gap=float(np.mean(fresh_gaps)) if fresh_gaps else math.nan, fresh_train_loss=fresh_train,
        loss_minus_oracle={float(p.values["N"]): p.mean("loss") - p.mean("loss_oracle") for p in every},
        err_minus_oracle={float(p.values["N"]): p.mean("err") - p.mean("err_oracle") for p in every},
        init_loss=init_loss, init_loss_rule=init_rule, memorised=memorised, memorised_by=memorised_by, fitted=fitted,
        not_positive=not_positive, floor=floor, excess_fit=excess_fit, upper_fit=upper_fit, asymptote_fit=asymptote,
        gap_fit=gap_fit, upper_fitted=upper if enough else [], asymptote_sizes=sorted(outside_loss),
        asymptote_params=params, gap_fitted=sorted(gap_fit_values),
        seeds=len({s for p in every for s in p.final("loss")}), other_families=len(candidates) - 1,
        incomplete=unfinished_members(family, runs, "N"),
    )
    result.excess_intercept = _intercept({n: excess[n] for n in fitted}, excess_fit)
    result.gap_intercept = _intercept(gap_fit_values, gap_fit)
    return result


def _intercept(values: dict[float, dict[Hashable, float]], fit: scaling.Interval) -> float:
    """log-log intercept at the point-estimate slope, through the seed-mean points (for drawing the fit)."""
    if not fit.ok:
        return math.nan
    pts = [(n, seed_mean(v)) for n, v in values.items() if v]
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
    incomplete: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return _unless_unfinished(scaling.verdict(self.fit, 0.0, strict=True), self.incomplete)


def axis_trends(points: Sequence[Point], axis: str, runs: Sequence[RunRecord] = ()) -> list[AxisTrend]:
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
            xs=xs, err={x: seed_mean(v) for x, v in err_seeds.items()}, err_seeds=err_seeds,
            err_em_depth={float(p.values[axis]): p.mean("err_em_depth") for p in family},
            err_em=float(np.nanmean([p.mean("err_em") for p in family])),
            err_oracle=float(np.nanmean([p.mean("err_oracle") for p in family])),
            fit=scaling.per_doubling_interval(err_seeds), incomplete=unfinished_members(family, runs, axis),
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
    incomplete: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return _unless_unfinished(scaling.verdict(self.fit, RATE_SLOPE), self.incomplete)

    def ratio(self, method: str, delta: float) -> float:
        oracle = self.err["oracle"].get(delta, math.nan)
        return self.err[method].get(delta, math.nan) / oracle if oracle > 0 else math.nan


METHOD_KEYS = {"model": "err", "em": "err_em", "lloyd": "err_lloyd", "oracle": "err_oracle"}


def separation_trends(points: Sequence[Point], runs: Sequence[RunRecord] = ()) -> list[SeparationTrend]:
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
                                      oracle[0] if oracle else math.nan,
                                      unfinished_members(family, runs, "task.separation")))
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


BEATS_EM_SES = 2.0
"""the model beats EM only when err − err_EM is below −2 paired standard errors (benchmarks/bench_quality.py)"""


@dataclass
class SettingRow:
    setting: str
    outside: list[str]
    seeds: int
    err: float
    err_em: float
    err_lloyd: float
    err_oracle: float
    difference: float
    """err − err_em, mean over seeds"""
    se: float
    """paired standard error of the difference (see `se_method`); nan when there is none"""
    se_method: str

    @property
    def beats_em(self) -> str:
        if not (math.isfinite(self.se) and self.se > 0):
            return f"undecided (no standard error: {self.se_method})"
        if self.difference < -BEATS_EM_SES * self.se:
            return "yes"
        if self.difference > BEATS_EM_SES * self.se:
            return "no"
        return f"tie (within {BEATS_EM_SES:g} SE)"

    def describe_difference(self) -> str:
        if not math.isfinite(self.difference):
            return "n/a"
        return f"{self.difference:+.4f} ± {self.se:.4f}" if math.isfinite(self.se) else f"{self.difference:+.4f}"


def _setting_row(name: str, outside: list[str], table: dict[str, dict[Hashable, float]],
                 episode_se: Optional[dict[Hashable, float]] = None) -> SettingRow:
    """table: metric (err, err_em, err_lloyd, err_oracle) -> seed -> value; episode_se: seed -> the paired
    per-episode SE of err − err_em of that seed's run (when its episodes were scored, as --test-shift does).

    The SE is the larger of the one over seeds (≥ 2 seeds; every seed is scored on the same eval set, so
    this misses the episode noise) and the mean per-episode one (which misses the seed noise)."""
    err, em = table.get("err", {}), table.get("err_em", {})
    seeds = [s for s in err if s in em]
    diffs = [err[s] - em[s] for s in seeds]
    candidates, methods = [], []
    if len(diffs) >= 2:
        candidates.append(float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))))
        methods.append(f"paired over {len(diffs)} seeds")
    per_episode = [episode_se[s] for s in seeds if episode_se and s in episode_se]
    if per_episode:
        candidates.append(float(np.mean(per_episode)))
        methods.append("paired per episode")
    se = max(candidates) if candidates else math.nan
    method = " / ".join(methods) if methods else f"{len(diffs)} seed, episodes not scored"
    mean = {key: seed_mean(table.get(key, {})) for key in ("err", "err_em", "err_lloyd", "err_oracle")}
    return SettingRow(name, outside, len(seeds), mean["err"], mean["err_em"], mean["err_lloyd"], mean["err_oracle"],
                      float(np.mean(diffs)) if diffs else math.nan, se, method)


def beyond_theory(points: Sequence[Point], shifted: Sequence["ShiftResult"] = ()) -> Optional[list[SettingRow]]:
    """Model err against EM err per setting, when some point of the sweep is outside the theory or the
    report evaluated runs at test time on a shifted task (`shifted`: one per run and shift)."""
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
            se = {r.seed: results[r.path.resolve()]["err_minus_em_se"] for r in runs
                  if "err_minus_em_se" in results[r.path.resolve()]}
            rows.append(_setting_row(f"{label(p.values, keys)}; {shift.label}",
                                     [*outside_theory(p.values), f"{shift.label} (trained on another task)"], table, se))
    return sorted(rows, key=lambda r: (bool(r.outside), r.setting))
