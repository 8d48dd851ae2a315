"""Slope fits with intervals over seeds: the arithmetic behind the report's checks (numpy, scipy.stats.t).

Every check of the report is a slope with a 95% interval, compared with a threshold from the theory:

- sample complexity: b in log(test loss_N − test loss_∞) = a + b·log N, checked against b ≤ −1/2 (and the
  exponent of a free-asymptote fit L_N = L_∞ + a·N^b, see `asymptote_fit`);
- depth / heads: the change of err per doubling of L (or M), checked against < 0;
- separation: the slope of log err against Δ², checked against ≤ −1/8.

Observations are held as `values[x][seed] = y` (one number per point and seed). How the interval is made
depends on how many seeds there are, because a resampling interval is only as good as its resamples:

- ≥ 5 seeds (MIN_SEEDS_FOR_BOOTSTRAP): percentile bootstrap over seeds — draw as many seeds as there are,
  with replacement, average each point's values over the drawn seeds (a seed drawn twice counts twice), refit.
- 2–4 seeds: a Student t interval over the per-seed estimates (seeds − 1 degrees of freedom). With 2 seeds a
  bootstrap has three distinct draws and its "interval" is the range of the two slopes.
- 1 seed: no interval at all (NOT ENOUGH DATA).

A fit whose points cannot all be transformed (e.g. a logarithm of an excess ≤ 0) has no value: points never
drop out of a draw silently. A bootstrap with too many such draws has no interval (the note says why).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Hashable, Mapping, Optional, Sequence

import numpy as np
from scipy import stats

Values = Mapping[float, Mapping[Hashable, float]]
"""values[x][seed] = y: one observation per point x and seed"""

PASS, FAIL, INCONCLUSIVE, NO_DATA = "PASS", "FAIL", "INCONCLUSIVE", "NOT ENOUGH DATA"
MIN_SEEDS_FOR_BOOTSTRAP = 5
"""fewer seeds than this get a t interval (2–4) or none (1)"""
N_BOOT = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its interval over seeds, with the method that made it."""

    estimate: float
    low: float
    high: float
    method: str
    """'seed bootstrap', 't' or 'none'"""
    n_seeds: int
    n_draws: int = 0
    """bootstrap draws made (0 for t / none)"""
    note: str = ""
    """why there is no interval, when there is none"""
    level: float = LEVEL
    unidentified: str = ""
    """why the estimate is not identified by the data (e.g. at the bound of a search grid): its verdict is
    INCONCLUSIVE whatever the interval says"""

    @property
    def ok(self) -> bool:
        return math.isfinite(self.estimate) and math.isfinite(self.low) and math.isfinite(self.high)

    def describe(self, digits: int = 2) -> str:
        if not self.ok:
            return "n/a"
        return f"[{self.low:.{digits}f}, {self.high:.{digits}f}]"

    @property
    def label(self) -> str:
        """The method, named next to every interval in the report: "95% t (3 seeds)" and so on."""
        pct = f"{100 * self.level:g}%"
        seeds = f"{self.n_seeds} seed{'s' if self.n_seeds != 1 else ''}"
        if self.method == "seed bootstrap":
            text = f"{pct} seed bootstrap ({seeds}, {self.n_draws} draws)"
        elif self.method == "t":
            text = f"{pct} t ({seeds})"
        else:
            text = f"no interval ({seeds})"
        return text if self.ok or not self.note else f"{text}: {self.note}"


NO_INTERVAL = Interval(math.nan, math.nan, math.nan, "none", 0, note="no fit")


def line_slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[tuple[float, float]]:
    """Least-squares (slope, intercept) of y on x; None with fewer than 2 distinct x or a non-finite value.

    Closed form in plain Python: the bootstrap calls this thousands of times on a handful of points."""
    n = len(xs)
    if n < 2 or n != len(ys) or not all(math.isfinite(v) for v in (*xs, *ys)):
        return None
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx <= 1e-12 * max(1.0, mean_x * mean_x) * n:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    return float(slope), float(mean_y - slope * mean_x)


def seed_means(values: Values, seeds: Sequence[Hashable]) -> dict[float, float]:
    """Mean of each point's values over `seeds` (with multiplicity); points with none of them are left out."""
    means = {}
    for x, by_seed in values.items():
        picked = [by_seed[s] for s in seeds if s in by_seed]
        if picked:
            means[x] = sum(picked) / len(picked)
    return means


def all_seeds(*tables: Values) -> list[Hashable]:
    """Every seed that occurs in any of the tables, sorted for determinism."""
    seen = {s for table in tables for by_seed in table.values() for s in by_seed}
    return sorted(seen, key=repr)


def bootstrap(statistic: Callable[[Sequence[Hashable]], Optional[float]], units: Sequence[Hashable], *,
              n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> Interval:
    """Percentile bootstrap of `statistic(sample)` where sample draws len(units) units with replacement.

    `statistic(units)` is the point estimate. A draw whose statistic is None (no fit) is not skipped: when
    more than the interval's tail share of the draws has no fit, there is no interval."""
    units = list(units)
    estimate = statistic(units) if units else None
    if estimate is None or not math.isfinite(estimate):
        return Interval(math.nan, math.nan, math.nan, "seed bootstrap", len(units), 0, "no fit on all seeds", level)
    rng = np.random.default_rng(seed)
    draws, failed = [], 0
    for _ in range(n_boot):
        picks = rng.integers(0, len(units), size=len(units))
        value = statistic([units[i] for i in picks])
        if value is None or not math.isfinite(value):
            failed += 1
        else:
            draws.append(value)
    # a draw without a fit counts as lying beyond either end (half each): it widens the interval, and when
    # too many draws fail the interval's ends are infinite, i.e. there is none
    tail = 100 * (1 - level) / 2
    padded = np.concatenate([draws, np.full(failed // 2, -np.inf), np.full(failed - failed // 2, np.inf)])
    with np.errstate(invalid="ignore"):  # an end among the ±inf draws interpolates to nan: no interval
        low, high = np.percentile(padded, [tail, 100 - tail]) if len(padded) else (math.nan, math.nan)
    if not (math.isfinite(low) and math.isfinite(high)):
        return Interval(float(estimate), math.nan, math.nan, "seed bootstrap", len(units), n_boot,
                        f"{failed} of {n_boot} draws had no fit (e.g. an excess ≤ 0)", level)
    return Interval(float(estimate), float(low), float(high), "seed bootstrap", len(units), n_boot, "", level)


def t_interval(per_seed: Mapping[Hashable, Optional[float]], level: float = LEVEL) -> Interval:
    """Student t interval (seeds − 1 dof) around the mean of per-seed estimates; none for < 2 seeds."""
    n = len(per_seed)
    missing = [s for s, v in per_seed.items() if v is None or not math.isfinite(v)]
    if missing:
        return Interval(math.nan, math.nan, math.nan, "t", n, 0,
                        f"no fit for seed(s) {', '.join(map(str, missing))}", level)
    values = np.array(list(per_seed.values()), dtype=float)
    if n < 2:
        return Interval(float(values[0]) if n else math.nan, math.nan, math.nan, "none", n, 0,
                        "one seed: NOT ENOUGH DATA", level)
    half = float(stats.t.ppf(1 - (1 - level) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))
    mean = float(values.mean())
    return Interval(mean, mean - half, mean + half, "t", n, 0, "", level)


def seed_interval(statistic: Callable[[Sequence[Hashable]], Optional[float]], seeds: Sequence[Hashable], *,
                  n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> Interval:
    """The interval the number of seeds supports: bootstrap (≥ 5), t over per-seed estimates (2–4), none (1).

    `statistic(sample)` computes the estimate from a list of seeds (a seed may repeat)."""
    seeds = list(seeds)
    if len(seeds) >= MIN_SEEDS_FOR_BOOTSTRAP:
        return bootstrap(statistic, seeds, n_boot=n_boot, level=level, seed=seed)
    if len(seeds) >= 2:
        return t_interval({s: statistic([s]) for s in seeds}, level)
    if not seeds:
        return NO_INTERVAL
    estimate = statistic(seeds)
    return Interval(math.nan if estimate is None else float(estimate), math.nan, math.nan, "none", 1, 0,
                    "one seed: NOT ENOUGH DATA", level)


Pairs = list[tuple[float, float]]
"""(x, y) points to fit"""


def _fitter(transform: Callable[[float, float], Optional[tuple[float, float]]]) -> Callable[[Pairs], Optional[float]]:
    """A line fit after mapping each (x, y) by `transform`; no fit at all when any point cannot be mapped
    (dropping it would change which points the slope is fitted on from draw to draw)."""
    def fit(pairs: Pairs) -> Optional[float]:
        mapped = [transform(x, y) for x, y in pairs]
        if any(m is None for m in mapped):
            return None
        result = line_slope([m[0] for m in mapped], [m[1] for m in mapped])
        return None if result is None else result[0]

    return fit


def _log_log(x: float, y: float) -> Optional[tuple[float, float]]:
    return (math.log(x), math.log(y)) if x > 0 and y > 0 and math.isfinite(y) else None


def _log2_x(x: float, y: float) -> Optional[tuple[float, float]]:
    return (math.log2(x), y) if x > 0 and math.isfinite(y) else None


def _squared_x_log_y(x: float, y: float) -> Optional[tuple[float, float]]:
    return (x * x, math.log(y)) if y > 0 and math.isfinite(y) else None


def _interval_of_fit(fit: Callable[[Pairs], Optional[float]], values: Values, **kwargs) -> Interval:
    return seed_interval(lambda sample: fit(sorted(seed_means(values, sample).items())), all_seeds(values), **kwargs)


def power_law_interval(values: Values, **kwargs) -> Interval:
    """Slope b of log y = a + b·log x with its interval over seeds (no fit when some y ≤ 0)."""
    return _interval_of_fit(_fitter(_log_log), values, **kwargs)


def excess_means(values: Values, reference: Mapping[Hashable, float],
                 sample: Sequence[Hashable]) -> dict[float, float]:
    """Seed means of y_x − y_ref over `sample`; the reference averaged over the same drawn seeds (paired)."""
    ref = [reference[s] for s in sample if s in reference]
    if not ref:
        return {}
    base = sum(ref) / len(ref)
    return {x: y - base for x, y in seed_means(values, sample).items()}


def excess_power_law_interval(values: Values, reference: Mapping[Hashable, float], *, xs: Optional[Sequence[float]] = None,
                              **kwargs) -> Interval:
    """Slope b of log(y_x − y_ref) against log x over the points `xs` (default all), where y_ref (e.g. the
    N = ∞ loss) has its own seeds. Each draw averages both over the same drawn seeds, so the reference's own
    seed noise is inside the interval. A draw with an excess ≤ 0 at any of `xs` has no fit."""
    keep = set(values) if xs is None else set(xs)
    fit = _fitter(_log_log)
    seeds = all_seeds(values, {0.0: reference})
    return seed_interval(lambda sample: fit(sorted((x, y) for x, y in excess_means(values, reference, sample).items()
                                                   if x in keep)), seeds, **kwargs)


ASYMPTOTE_EXPONENTS = np.linspace(-8.0, -0.0025, 3200)
"""the grid of b for `asymptote_fit` (steps of 0.0025: finer than any interval the report prints).

Why these ends: at b = −8 the term a·N^b falls 256-fold per doubling of N, so every N past the smallest sits
on L_∞ within any noise a study has: steeper exponents describe the same data (one point above a flat line)
and cannot be told apart. At b → 0 there is no decay (L_∞ and a trade off without limit). A best fit at
either end is therefore not an estimate of b (`asymptote_interval` marks it unidentified). The lower end is
far below any slope a study resolves, so an interval that reaches it is censored there, not measured: the
grid must not be narrowed to where the estimates happen to lie."""


def asymptote_fit(xs: Sequence[float], ys: Sequence[float]) -> Optional[tuple[float, float, float]]:
    """Least-squares (L_∞, a, b) of y = L_∞ + a·x^b with L_∞ free; None with < 3 points or no decay (a ≤ 0).

    For fixed b the model is linear in (L_∞, a), so the residual is profiled over b on a grid (vectorised:
    the bootstrap refits thousands of times) and the best grid value is the fit."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(x) < 3 or len(set(x.tolist())) < 3 or not np.all(np.isfinite(y)) or np.any(x <= 0):
        return None
    scale = x.min()  # x / min(x) keeps x^b within [small, 1] for every b of the grid
    z = (x[None, :] / scale) ** ASYMPTOTE_EXPONENTS[:, None]
    zm, ym = z.mean(1, keepdims=True), y.mean()
    a = ((z - zm) * (y - ym)).sum(1) / np.maximum(((z - zm) ** 2).sum(1), 1e-300)
    c = ym - a * zm[:, 0]
    rss = ((y[None, :] - c[:, None] - a[:, None] * z) ** 2).sum(1)
    i = int(np.argmin(rss))
    if not a[i] > 0:
        return None
    b = float(ASYMPTOTE_EXPONENTS[i])
    return float(c[i]), float(a[i] * scale ** -b), b


def at_grid_bound(b: float) -> bool:
    """Whether an exponent from `asymptote_fit` lies on an end of its grid (not identified)."""
    return b in (float(ASYMPTOTE_EXPONENTS[0]), float(ASYMPTOTE_EXPONENTS[-1]))


def asymptote_interval(values: Values, **kwargs) -> Interval:
    """Exponent b of y = L_∞ + a·x^b (L_∞ fitted) with its interval over seeds.

    When the fit the estimate rests on (all seeds' means; each seed's own with a t interval) is at an end of
    the grid, the residual still falls beyond it: the data do not identify b, and a PASS on "b ≤ −1/2" would
    rest on the grid's end, not on the data. The interval is kept (with its method) and marked unidentified,
    which makes its verdict INCONCLUSIVE. Bootstrap draws at an end only censor that tail of the interval:
    a percentile inside the grid is the same whatever lies beyond the end, and the end facing the threshold
    (−1/2, far inside the grid) decides the verdict, so draws at an end need no other rule."""
    def statistic(sample: Sequence[Hashable]) -> Optional[float]:
        pairs = sorted(seed_means(values, sample).items())
        fit = asymptote_fit([p[0] for p in pairs], [p[1] for p in pairs])
        return None if fit is None else fit[2]

    seeds = all_seeds(values)
    interval = seed_interval(statistic, seeds, **kwargs)
    bases = [[s] for s in seeds] if interval.method == "t" else [seeds]
    hits = [b for b in (statistic(base) for base in bases) if b is not None and at_grid_bound(b)]
    if hits:
        return replace(interval, unidentified=f"at the bound of the search grid (b = {hits[0]:g}): b is not "
                                              "identified by these points")
    return interval


def per_doubling_interval(values: Values, **kwargs) -> Interval:
    """Slope of y against log2 x (the change of y per doubling of x) with its interval over seeds."""
    return _interval_of_fit(_fitter(_log2_x), values, **kwargs)


def squared_rate_interval(values: Values, **kwargs) -> Interval:
    """Slope of log y against x² (for err against Δ: theory −1/8) with its interval over seeds."""
    return _interval_of_fit(_fitter(_squared_x_log_y), values, **kwargs)


def verdict(interval: Interval, threshold: float, strict: bool = False) -> str:
    """PASS if the whole interval is ≤ threshold (< with strict), FAIL if the whole interval is above it
    (≥ with strict), INCONCLUSIVE if it straddles or the estimate is not identified (`Interval.unidentified`),
    NOT ENOUGH DATA if there is no interval."""
    if not interval.ok:
        return NO_DATA
    if interval.unidentified:
        return INCONCLUSIVE
    if interval.high < threshold or (not strict and interval.high == threshold):
        return PASS
    if interval.low > threshold or (strict and interval.low == threshold):
        return FAIL
    return INCONCLUSIVE
