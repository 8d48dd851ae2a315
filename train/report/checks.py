"""The report's checks against the theory, computed from run records (no plotting, no files).

Runs are grouped into *points* (same config up to the seeds). A check needs a *family*: points that differ
only along one axis (N, depth L, heads M or separation Δ). Each check returns the numbers its figure and
its sentence need, or None when the sweep has no such family ("not in this sweep").
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Hashable, Optional, Sequence

import numpy as np

from emformer.data.tasks import TaskSpec, anchored
from emformer.train.config import to_run_config
from emformer.train.report import resample, scaling
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


# --------------------------------------------------------------------------- observations
EPISODE_KEYS = {"err": "err_model", "loss": "loss_model", "err_em": "err_em", "loss_em": "loss_em",
                "err_lloyd": "err_lloyd", "err_oracle": "err_oracle", "loss_oracle": "loss_oracle",
                "err_init": "err_init", "loss_init": "loss_init"}
"""a val row's key -> its per-episode array in a run's episodes.npz"""
DIFFERENCES = {"err_minus_em": ("err", "err_em")}
"""derived keys: a difference of two keys, paired episode by episode"""


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_value(run: RunRecord, key: str) -> tuple[Optional[float], Optional[np.ndarray]]:
    """(the final row's value of `key`, its per-episode figures or None) for one run."""
    if key in DIFFERENCES:
        (a, a_eps), (b, b_eps) = (run_value(run, k) for k in DIFFERENCES[key])
        value = a - b if a is not None and b is not None else None
        return value, (a_eps - b_eps if a_eps is not None and b_eps is not None else None)
    row = run.final or {}
    value = float(row[key]) if _finite_number(row.get(key)) else None
    episodes = run.episodes
    return value, (episodes.get(EPISODE_KEYS[key]) if episodes is not None and key in EPISODE_KEYS else None)


def family_observations(points: Sequence[tuple[float, Point]], keys: Sequence[str]) -> resample.Observations:
    """Observations of `keys` for points placed at x: each run's final-row values and, where it saved them,
    the per-episode figures, tagged with its eval set (eval seed, episodes) so draws pair runs on one set."""
    obs = resample.Observations()
    for x, point in points:
        for run in point.runs:
            episodes = run.episodes
            eval_set = (episodes["eval_seed"], len(episodes["points"])) if episodes is not None else None
            for key in keys:
                value, per_episode = run_value(run, key)
                if value is not None:
                    obs.add(key, x, run.seed, value, per_episode, eval_set)
    return obs


def _mean_over(by_slot: dict[Hashable, float], slots: Sequence[Hashable]) -> float:
    picked = [by_slot[s] for s in slots if s in by_slot]
    return sum(picked) / len(picked) if picked else math.nan


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
    """N outside the memorisation region whose excess clears the paired-SE floor (on the data; every bootstrap
    draw chooses its own, see `complexity_fit`)"""
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
    noise: Optional[tuple[float, float]] = None
    """(SD of b from all fitted N over the seed draws, over the episode draws): Interval.noise"""

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
    # torch (~2 s of CPU to import): only runs that predate loss_init in their val rows need episodes here.
    import torch

    from emformer.data.episodes import sample_episodes
    from emformer.models.baselines import init_figures

    spec = TaskSpec(**json.loads(task_json))
    losses = [init_figures(sample_episodes(spec, seed, range(start, min(episodes, start + 256))))["loss_init"].double()
              for start in range(0, episodes, 256)]
    return float(torch.cat(losses).mean())


def init_only_loss(config: dict[str, Any]) -> tuple[float, str]:
    """Test loss of the init alone (models.baselines.init_figures) on the run's eval set, for runs whose val
    rows predate loss_init. Without an init, log k (a uniform guess)."""
    task = dict(config.get("task", {}))
    if not anchored(task.get("init", "noisy_truth")):
        k = task.get("k_max") or task.get("k", 2)
        return math.log(k), "log k (uniform guess; the task has no init)"
    try:
        ev = to_run_config(config).eval
        value = _init_only_loss_cached(json.dumps(task, sort_keys=True), int(ev.seed), int(ev.episodes))
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


@dataclass
class ComplexityFit:
    """Every choice and slope of the sample-complexity check on one table (the data, or one bootstrap draw)."""

    memorised_by: dict[float, str]
    outside: list[float]
    excess: dict[float, dict[Hashable, float]]
    floor: dict[float, float]
    fitted: list[float]
    gap: dict[float, dict[Hashable, float]]
    gap_floor: float
    gap_fitted: list[float]
    slopes: dict[str, Optional[float]]
    """all / upper / asymptote / gap -> b (None: no fit)"""
    asymptote: Optional[tuple[float, float, float]] = None


def complexity_fit(tables: resample.Tables, slots: Sequence[Hashable], sizes: Sequence[float]) -> ComplexityFit:
    """The sample-complexity check on `tables` ("loss", "train_loss" at each N and at ∞; "loss_init" at ∞),
    from the seeds (or drawn slots) `slots`: the memorisation region, the paired-SE floor, the fitted N and
    the three estimates of b, plus the gap's. The bootstrap calls this on every draw, so each of these
    choices is made again in every draw."""
    loss, train, init = tables.get("loss", {}), tables.get("train_loss", {}), tables.get("loss_init", {})
    fresh = {s: v for s, v in loss.get(math.inf, {}).items() if s in slots}
    fresh_mean = _mean_over(fresh, slots)
    fresh_train = _mean_over(train.get(math.inf, {}), slots)
    init_loss = _mean_over(init.get(math.inf, {}), slots)
    present = [n for n in sizes if any(s in loss.get(n, {}) for s in slots)]
    memorised_by = memorisation_region({n: _mean_over(train.get(n, {}), slots) for n in present},
                                       {n: _mean_over(loss.get(n, {}), slots) for n in present}, fresh_train, init_loss)
    outside = [n for n in present if n not in memorised_by]
    excess = {n: {s: loss[n][s] - fresh.get(s, fresh_mean) for s in slots if s in loss[n]} for n in present}
    floor = {n: FLOOR_SES * _paired_se(excess[n]) for n in outside}
    fitted = [n for n in outside if excess[n] and seed_mean(excess[n]) > max(floor[n], 0.0)]
    # The fresh run's own test − train gap is pure sampling noise (two finite episode sets, no memorisation):
    # a pool gap below it says nothing about N, and its logarithm would steepen the fit at will.
    gap = {n: {s: loss[n][s] - train[n][s] for s in slots if s in loss[n] and s in train.get(n, {})} for n in present}
    fresh_gaps = [fresh[s] - train[math.inf][s] for s in slots if s in fresh and s in train.get(math.inf, {})]
    gap_floor = abs(float(np.mean(fresh_gaps))) if fresh_gaps else 0.0
    gap_fitted = [n for n in outside if gap[n] and seed_mean(gap[n]) > gap_floor]
    means = [(n, _mean_over(loss[n], slots)) for n in outside]
    asymptote = scaling.asymptote_fit([n for n, _ in means], [y for _, y in means]) if len(means) >= 3 else None

    def log_log(points: Sequence[float], table: dict[float, dict[Hashable, float]]) -> Optional[float]:
        return scaling.log_log_slope([(n, seed_mean(table[n])) for n in points])

    enough = len(fitted) >= MIN_FITTED_SIZES
    slopes = {"all": log_log(fitted, excess) if enough else None,
              "upper": log_log(fitted[len(fitted) // 2:], excess) if enough else None,
              "asymptote": asymptote[2] if asymptote is not None else None,
              "gap": log_log(gap_fitted, gap) if len(gap_fitted) >= MIN_FITTED_SIZES else None}
    return ComplexityFit(memorised_by, outside, excess, floor, fitted, gap, gap_floor, gap_fitted, slopes, asymptote)


def complexity_intervals(obs: resample.Observations, sizes: Sequence[float], **kwargs
                         ) -> tuple[ComplexityFit, dict[str, scaling.Interval]]:
    """(the fit on the data, name -> interval of all / upper / asymptote / gap) from the same draws. An
    asymptote whose estimate (on all seeds; on each seed with a t interval) is at an end of its grid is
    marked unidentified (scaling.asymptote_interval says why)."""
    fit = complexity_fit(obs.rows, obs.seeds, sizes)
    intervals = resample.resample(lambda tables, slots: complexity_fit(tables, slots, sizes).slopes, obs, **kwargs)
    asym = intervals["asymptote"]
    bases = [[s] for s in obs.seeds] if asym.method == "t" else [obs.seeds]
    hits = [b for b in (complexity_fit(obs.rows, base, sizes).slopes["asymptote"] for base in bases)
            if b is not None and scaling.at_grid_bound(b)]
    if hits:
        intervals["asymptote"] = replace(asym, unidentified=f"at the bound of the search grid (b = {hits[0]:g}): b is "
                                                            "not identified by these points")
    return fit, intervals


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
    placed = [(float(p.values["N"]), p) for p in [*finite, fresh]]
    obs = family_observations(placed, ["loss", "train_loss"])
    init_rows = family_observations([(math.inf, fresh)], ["loss_init"])
    if init_rows.rows.get("loss_init"):
        obs.rows["loss_init"] = init_rows.rows["loss_init"]
        obs.episodes.update(init_rows.episodes)
        obs.eval_sets.update(init_rows.eval_sets)
        init_loss = seed_mean(obs.rows["loss_init"][math.inf])
        init_rule = "init-only loss (posterior of the initial centroids with the true σ, same eval set)"
    else:  # runs made before the val rows carried loss_init
        init_loss, init_rule = init_only_loss(fresh.config)
        obs.rows["loss_init"] = {math.inf: {s: init_loss for s in fresh.final("loss")}}
    fit, intervals = complexity_intervals(obs, sizes)

    loss = {n: p.final("loss") for n, p in placed if n != math.inf}
    fresh_loss = fresh.final("loss")
    fresh_train = fresh.mean("train_loss")
    fresh_test, fresh_train_by_seed = fresh.final("loss"), fresh.final("train_loss")
    fresh_gaps = [fresh_test[s] - fresh_train_by_seed[s] for s in fresh_test if s in fresh_train_by_seed]
    enough = len(fit.fitted) >= MIN_FITTED_SIZES
    outside_loss = {n: loss[n] for n in fit.outside if loss[n]}
    every = [*finite, fresh]
    result = SampleComplexity(
        family=label(fresh.values, family_keys(points, "N")),
        sizes=sizes, excess=fit.excess, gap=fit.gap, loss=loss, fresh_loss=fresh_loss,
        fresh_gap=float(np.mean(fresh_gaps)) if fresh_gaps else math.nan, fresh_train_loss=fresh_train,
        loss_minus_oracle={float(p.values["N"]): p.mean("loss") - p.mean("loss_oracle") for p in every},
        err_minus_oracle={float(p.values["N"]): p.mean("err") - p.mean("err_oracle") for p in every},
        init_loss=init_loss, init_loss_rule=init_rule, memorised=sorted(fit.memorised_by),
        memorised_by=fit.memorised_by, fitted=fit.fitted,
        not_positive=[n for n in fit.outside if n not in fit.fitted], floor=fit.floor,
        excess_fit=intervals["all"] if enough else scaling.NO_INTERVAL,
        upper_fit=intervals["upper"] if enough else scaling.NO_INTERVAL,
        asymptote_fit=intervals["asymptote"] if enough else scaling.NO_INTERVAL,
        gap_fit=intervals["gap"] if len(fit.gap_fitted) >= MIN_FITTED_SIZES else scaling.NO_INTERVAL,
        upper_fitted=fit.fitted[len(fit.fitted) // 2:] if enough else [], asymptote_sizes=sorted(outside_loss),
        asymptote_params=fit.asymptote, gap_fitted=fit.gap_fitted,
        seeds=len({s for p in every for s in p.final("loss")}), other_families=len(candidates) - 1,
        incomplete=unfinished_members(family, runs, "N"), noise=intervals["all"].noise,
    )
    result.excess_intercept = _intercept({n: fit.excess[n] for n in fit.fitted}, result.excess_fit)
    result.gap_intercept = _intercept({n: fit.gap[n] for n in fit.gap_fitted}, result.gap_fit)
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
FALLS, RISES, NO_EFFECT = "FALLS", "RISES", "NO EFFECT WORTH HAVING"
DEFAULT_SMALLEST_EFFECT = 0.01
"""the margin when the sweep spec declares none (report.smallest_effect): 1% of err per doubling"""


def equivalence_verdict(interval: scaling.Interval, margin: float) -> str:
    """NO EFFECT WORTH HAVING when the whole interval lies inside (−margin, +margin) (both one-sided tests
    reject an effect of the margin's size); else FALLS when it lies below 0, RISES when above; else
    INCONCLUSIVE; NOT ENOUGH DATA without an interval."""
    if not interval.ok:
        return scaling.NO_DATA
    if -margin < interval.low and interval.high < margin:
        return NO_EFFECT
    if interval.high < 0:
        return FALLS
    if interval.low > 0:
        return RISES
    return scaling.INCONCLUSIVE


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
    """change of err per doubling"""
    relative_fit: scaling.Interval = scaling.NO_INTERVAL
    """the same as a fraction of the family's mean err (what the margin is in)"""
    margin: float = DEFAULT_SMALLEST_EFFECT
    incomplete: list[str] = field(default_factory=list)
    noise: Optional[tuple[float, float]] = None
    """(SD of the relative slope over seeds alone, over eval episodes alone)"""

    @property
    def verdict(self) -> str:
        return _unless_unfinished(equivalence_verdict(self.relative_fit, self.margin), self.incomplete)


def trend_slopes(tables: resample.Tables, slots: Sequence[Hashable]) -> dict[str, Optional[float]]:
    means = sorted(scaling.seed_means(tables.get("err", {}), slots).items())
    slope = scaling.per_doubling_slope(means)
    level = float(np.mean([y for _, y in means])) if means else math.nan
    if slope is None:
        return {"slope": None, "relative": None}
    return {"slope": slope, "relative": slope / level if level > 0 else None}


def axis_trends(points: Sequence[Point], axis: str, runs: Sequence[RunRecord] = (),
                margin: float = DEFAULT_SMALLEST_EFFECT) -> list[AxisTrend]:
    """err against `axis` at the largest N in the sweep, one trend per family (e.g. per number of heads);
    `margin`: the smallest relative effect per doubling worth having (the sweep spec's report.smallest_effect)."""
    sizes = [p.values.get("N") for p in points if p.values.get("N") is not None]
    largest = max(sizes) if sizes else None
    at_largest = [p for p in points if p.values.get("N") == largest]
    trends = []
    others = family_keys(at_largest, axis)
    for family in families(at_largest, axis):
        family.sort(key=lambda p: p.values[axis])
        xs = [float(p.values[axis]) for p in family]
        err_seeds = _table(family, axis, "err")
        obs = family_observations([(float(p.values[axis]), p) for p in family], ["err"])
        fits = resample.resample(trend_slopes, obs)
        trends.append(AxisTrend(
            axis=axis, family=label(family[0].values, others),
            at_n=label({"N": largest}, ["N"]),
            xs=xs, err={x: seed_mean(v) for x, v in err_seeds.items()}, err_seeds=err_seeds,
            err_em_depth={float(p.values[axis]): p.mean("err_em_depth") for p in family},
            err_em=float(np.nanmean([p.mean("err_em") for p in family])),
            err_oracle=float(np.nanmean([p.mean("err_oracle") for p in family])),
            fit=fits["slope"], relative_fit=fits["relative"], margin=margin,
            incomplete=unfinished_members(family, runs, axis), noise=fits["relative"].noise,
        ))
    return trends


# --------------------------------------------------------------------------- separation (minimax rate)
RATIO_MARGIN = 1 / 32
"""the ratio check passes when log(err / err_oracle) rises against Δ² by less than this: the model's rate
exponent is within a quarter of the minimax 1/8 of the oracle's"""


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
    ratio_fit: scaling.Interval = scaling.NO_INTERVAL
    """slope of log(err / err_oracle) against Δ² (0: the model keeps the oracle's rate)"""
    noise: Optional[tuple[float, float]] = None
    """(SD of the slope over seeds alone, over eval episodes alone)"""

    @property
    def verdict(self) -> str:
        return _unless_unfinished(scaling.verdict(self.fit, RATE_SLOPE), self.incomplete)

    @property
    def ratio_verdict(self) -> str:
        return _unless_unfinished(scaling.verdict(self.ratio_fit, RATIO_MARGIN), self.incomplete)

    def ratio(self, method: str, delta: float) -> float:
        oracle = self.err["oracle"].get(delta, math.nan)
        return self.err[method].get(delta, math.nan) / oracle if oracle > 0 else math.nan


METHOD_KEYS = {"model": "err", "em": "err_em", "lloyd": "err_lloyd", "oracle": "err_oracle"}


def separation_choice(model: dict[float, float], oracle: dict[float, float], resolution: dict[float, float]
                      ) -> dict[float, str]:
    """Δ -> why it is left out of the fits (seed means): not well separated, or too few model errors."""
    excluded = {}
    for delta in sorted(model):
        if not oracle.get(delta, math.nan) < ORACLE_FIT_MAX_ERR:
            excluded[delta] = f"oracle err {oracle.get(delta, math.nan):.3g} ≥ {ORACLE_FIT_MAX_ERR} (not well separated)"
        elif not model[delta] >= resolution[delta]:
            excluded[delta] = f"model err {model[delta]:.2g} < {MIN_RESOLVED_ERRORS} errors on the eval set"
    return excluded


def separation_slopes(tables: resample.Tables, slots: Sequence[Hashable],
                       resolution: dict[float, float]) -> dict[str, Optional[float]]:
    model = scaling.seed_means(tables.get("err", {}), slots)
    oracle = scaling.seed_means(tables.get("err_oracle", {}), slots)
    excluded = separation_choice(model, oracle, resolution)
    fitted = [d for d in sorted(model) if d not in excluded and oracle.get(d, 0) > 0 and model[d] > 0]
    if len(fitted) < 2:
        return {"slope": None, "ratio": None}
    return {"slope": scaling.squared_rate_slope([(d, model[d]) for d in fitted]),
            "ratio": scaling.squared_rate_slope([(d, model[d] / oracle[d]) for d in fitted])}


def separation_trends(points: Sequence[Point], runs: Sequence[RunRecord] = ()) -> list[SeparationTrend]:
    trends = []
    for family in families(points, "task.separation"):
        family.sort(key=lambda p: p.values["task.separation"])
        deltas = [float(p.values["task.separation"]) for p in family]
        err = {m: {float(p.values["task.separation"]): p.mean(k) for p in family} for m, k in METHOD_KEYS.items()}
        resolution = {d: MIN_RESOLVED_ERRORS / (p.config.get("eval", {}).get("episodes", 512) *
                                                p.config.get("task", {}).get("n", 128))
                      for p, d in zip(family, deltas)}
        excluded = separation_choice(err["model"], err["oracle"], resolution)
        fitted = [d for d in deltas if d not in excluded]
        obs = family_observations(list(zip(deltas, family)), ["err", "err_oracle"])
        fits = resample.resample(lambda t, s: separation_slopes(t, s, resolution), obs) if len(fitted) >= 2 \
            else {"slope": scaling.NO_INTERVAL, "ratio": scaling.NO_INTERVAL}
        oracle = scaling.line_slope([d * d for d in fitted if err["oracle"][d] > 0],
                                    [math.log(err["oracle"][d]) for d in fitted if err["oracle"][d] > 0])
        others = family_keys(points, "task.separation")
        trends.append(SeparationTrend(label(family[0].values, others), deltas, err, fitted, excluded, fits["slope"],
                                      oracle[0] if oracle else math.nan,
                                      unfinished_members(family, runs, "task.separation"), fits["ratio"],
                                      fits["slope"].noise))
    return trends


# --------------------------------------------------------------------------- model against EM
BEATS, LOSES, TIE = "BEATS EM", "LOSES TO EM", "TIE"


@dataclass
class EmComparison:
    """The model against EM from the same init on one point's eval sets: err − err_EM, paired per episode."""

    point: str
    err: float
    err_em: float
    difference: scaling.Interval

    @property
    def verdict(self) -> str:
        if not self.difference.ok:
            return scaling.NO_DATA
        return BEATS if self.difference.high < 0 else LOSES if self.difference.low > 0 else TIE


def em_comparisons(points: Sequence[Point]) -> list[EmComparison]:
    """err − err_EM per point with its interval (seeds and, where saved, episodes resampled: the difference
    is taken episode by episode, so the pairing is exact)."""
    keys = varying_keys(points)
    out = []
    for point in points:
        obs = family_observations([(0.0, point)], ["err_minus_em"])
        if not obs.rows:
            continue
        interval = resample.resample_one(lambda t, s: _mean_over(t.get("err_minus_em", {}).get(0.0, {}), s), obs)
        out.append(EmComparison(label(point.values, keys), point.mean("err"), point.mean("err_em"), interval))
    return sorted(out, key=lambda c: c.point)


# --------------------------------------------------------------------------- passes against EM iterations
PASS_EPISODE_KEYS = {"model": "err_pass", "em": "err_em_iter"}
"""each side's [E, T] per-episode errors in a run's episodes.npz (a model trained to iterate saves them)"""


@dataclass
class PassesAgainstEm:
    """A point of a model trained to iterate: err after t passes against EM's err after t iterations from the
    same init on the same eval episodes, t = 1..T (the passes every seed's run saved)."""

    point: str
    model: list[scaling.Interval]
    """seed-mean err after t passes, t = 1..T"""
    em: list[scaling.Interval]
    """seed-mean EM err after t iterations"""
    rows: list[EmComparison]
    """per t (point "t = ..."): err − err_EM paired per episode and its verdict, as `em_comparisons` decides"""

    @property
    def passes(self) -> list[int]:
        return list(range(1, len(self.rows) + 1))


def passes_against_em(points: Sequence[Point]) -> list[PassesAgainstEm]:
    """One comparison per point whose runs saved per-pass errors; [] when none did. The intervals resample
    seeds and eval episodes in one set of draws for every t, so each t's difference is paired episode by
    episode as err − err_EM is."""
    keys = varying_keys(points)
    out = []
    for point in points:
        runs = [r for r in point.runs
                if r.episodes is not None and all(key in r.episodes for key in PASS_EPISODE_KEYS.values())]
        if not runs:
            continue
        passes = min(min(r.episodes[key].shape[1] for key in PASS_EPISODE_KEYS.values()) for r in runs)
        obs = resample.Observations()
        for run in runs:
            episodes = run.episodes
            eval_set = (episodes["eval_seed"], len(episodes["points"]))
            for t in range(1, passes + 1):
                model, em = (episodes[PASS_EPISODE_KEYS[side]][:, t - 1] for side in ("model", "em"))
                for key, values in (("model", model), ("em", em), ("difference", model - em)):
                    obs.add(key, float(t), run.seed, float(values.mean()), values, eval_set)
        names = [(key, t) for key in ("model", "em", "difference") for t in range(1, passes + 1)]
        intervals = resample.resample(
            lambda tables, slots: {f"{key} {t}": _mean_over(tables.get(key, {}).get(float(t), {}), slots)
                                   for key, t in names}, obs)
        model = [intervals[f"model {t}"] for t in range(1, passes + 1)]
        em = [intervals[f"em {t}"] for t in range(1, passes + 1)]
        rows = [EmComparison(f"t = {t}", model[t - 1].estimate, em[t - 1].estimate, intervals[f"difference {t}"])
                for t in range(1, passes + 1)]
        out.append(PassesAgainstEm(label(point.values, keys), model, em, rows))
    return sorted(out, key=lambda c: c.point)


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
    interval: Optional[scaling.Interval] = None
    """the difference's interval where the runs saved their episodes (then it decides, not the SE)"""

    @property
    def beats_em(self) -> str:
        if self.interval is not None and self.interval.ok:
            return "yes" if self.interval.high < 0 else "no" if self.interval.low > 0 else "tie (interval covers 0)"
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
        if self.interval is not None and self.interval.ok:
            return f"{self.difference:+.4f} {self.interval.describe(4)}"
        return f"{self.difference:+.4f} ± {self.se:.4f}" if math.isfinite(self.se) else f"{self.difference:+.4f}"


def _setting_row(name: str, outside: list[str], table: dict[str, dict[Hashable, float]],
                 episode_se: Optional[dict[Hashable, float]] = None) -> SettingRow:
    """table: metric (err, err_em, err_lloyd, err_oracle) -> seed -> value; episode_se: seed -> the paired
    per-episode SE of err − err_em of that seed's run (when its episodes were scored, as --test-shift does).

    The SE combines the two sources in quadrature: the paired SE over seeds (≥ 2 seeds) and the per-episode
    SE of the seed mean, sqrt(mean of the seeds' squared per-episode SEs / seeds). With one eval set per
    seed the first already holds some episode noise, so the sum errs on the wide side."""
    err, em = table.get("err", {}), table.get("err_em", {})
    seeds = [s for s in err if s in em]
    diffs = [err[s] - em[s] for s in seeds]
    variance, methods = 0.0, []
    if len(diffs) >= 2:
        variance += float(np.var(diffs, ddof=1) / len(diffs))
        methods.append(f"paired over {len(diffs)} seeds")
    per_episode = [episode_se[s] for s in seeds if episode_se and s in episode_se]
    if per_episode:
        variance += float(np.mean(np.square(per_episode)) / len(per_episode))
        methods.append("paired per episode")
    se = math.sqrt(variance) if methods else math.nan
    method = " + ".join(methods) + (" (in quadrature)" if len(methods) > 1 else "") if methods \
        else f"{len(diffs)} seed, episodes not scored"
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
    rows = []
    for p in points:
        row = _setting_row(label(p.values, keys), outside_theory(p.values), {m: p.final(m) for m in metrics})
        compared = em_comparisons([p])
        if compared and compared[0].difference.ok and compared[0].difference.method == "two-level bootstrap":
            row.interval, row.se_method = compared[0].difference, compared[0].difference.label
        rows.append(row)
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
