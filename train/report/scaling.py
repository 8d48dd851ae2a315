"""Slope fits with bootstrap intervals over seeds: the arithmetic behind the report's checks (pure numpy).

Every check of the report is a slope with a 95% interval, compared with a threshold from the theory:

- sample complexity: b in log(test loss_N − test loss_∞) = a + b·log N, checked against b ≤ −1/2;
- depth / heads: the change of err per doubling of L (or M), checked against < 0;
- separation: the slope of log err against Δ², checked against ≤ −1/8.

Observations are held as `values[x][seed] = y` (one number per point and seed). The interval comes from
the bootstrap over seeds: draw as many seeds as there are, with replacement, average each point's values
over the drawn seeds (a seed drawn twice counts twice), refit, and take the 2.5% and 97.5% percentiles of
the refitted slopes. With a single seed there is nothing to resample across seeds, so the points
themselves are resampled instead (and the report says so).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, Optional, Sequence

import numpy as np

Values = Mapping[float, Mapping[Hashable, float]]
"""values[x][seed] = y: one observation per point x and seed"""

PASS, FAIL, INCONCLUSIVE, NO_DATA = "PASS", "FAIL", "INCONCLUSIVE", "NOT ENOUGH DATA"
MIN_POINTS_FOR_POINT_BOOTSTRAP = 3
"""with one seed, the point bootstrap needs at least this many points (else: estimate only, no interval)"""


@dataclass(frozen=True)
class Interval:
    """A point estimate (fit on all seeds) and its bootstrap percentile interval."""

    estimate: float
    low: float
    high: float
    resampled: str
    """what the bootstrap resampled: 'seeds', 'points (one seed)', or 'none' (no fit possible)"""
    n_units: int
    """how many seeds (or points) were resampled"""
    n_valid: int
    """bootstrap draws whose refit succeeded (some draws can leave too few distinct points)"""

    @property
    def ok(self) -> bool:
        return math.isfinite(self.estimate) and math.isfinite(self.low) and math.isfinite(self.high)

    def describe(self, digits: int = 2) -> str:
        if not self.ok:
            return "n/a"
        return f"[{self.low:.{digits}f}, {self.high:.{digits}f}]"


NO_INTERVAL = Interval(math.nan, math.nan, math.nan, "none", 0, 0)


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


def power_law_slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[tuple[float, float]]:
    """(b, a) of log y = a + b·log x; None unless all x, y > 0 and at least 2 distinct x."""
    if not xs or any(x <= 0 for x in xs) or any(y <= 0 for y in ys):
        return None
    return line_slope([math.log(x) for x in xs], [math.log(y) for y in ys])


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
              resampled: str = "seeds", n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap of `statistic(sample)` where sample draws len(units) units with replacement.

    `statistic(units)` itself is the point estimate; draws where the statistic is None are skipped (their
    count is reported as n_boot − n_valid)."""
    units = list(units)
    estimate = statistic(units) if units else None
    if estimate is None or not math.isfinite(estimate):
        return Interval(math.nan, math.nan, math.nan, "none", len(units), 0)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        picks = rng.integers(0, len(units), size=len(units))
        value = statistic([units[i] for i in picks])
        if value is not None and math.isfinite(value):
            draws.append(value)
    if not draws:
        return Interval(float(estimate), math.nan, math.nan, resampled, len(units), 0)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high), resampled, len(units), len(draws))


Pairs = list[tuple[float, float]]
"""(x, y) points to fit; x may repeat (a point drawn twice by the point bootstrap counts twice)"""


def _bootstrap_over_seeds_or_points(fit: Callable[[Pairs], Optional[float]],
                                    means_for: Callable[[Sequence[Hashable]], dict[float, float]],
                                    seeds: Sequence[Hashable], **kwargs) -> Interval:
    """Resample seeds when there are ≥ 2 of them; otherwise resample the points of the single seed."""
    if len(seeds) >= 2:
        return bootstrap(lambda sample: fit(sorted(means_for(sample).items())), seeds, resampled="seeds",
                         **kwargs)
    pairs = sorted(means_for(list(seeds)).items())
    usable = getattr(fit, "usable", lambda x, y: True)
    if sum(1 for x, y in pairs if usable(x, y)) < MIN_POINTS_FOR_POINT_BOOTSTRAP:
        # resampling 2 points gives back the same line (or none): an interval of width 0 would be a lie
        estimate = fit(pairs)
        return Interval(math.nan if estimate is None else estimate, math.nan, math.nan, "none", len(pairs), 0)
    return bootstrap(fit, pairs, resampled="points (one seed)", **kwargs)


def _fitter(transform: Callable[[float, float], Optional[tuple[float, float]]]) -> Callable[[Pairs], Optional[float]]:
    """A line fit after mapping each (x, y) by `transform` (None drops the point, e.g. log of y ≤ 0)."""
    def fit(pairs: Pairs) -> Optional[float]:
        mapped = [m for m in (transform(x, y) for x, y in pairs) if m is not None]
        result = line_slope([m[0] for m in mapped], [m[1] for m in mapped])
        return None if result is None else result[0]

    fit.usable = lambda x, y: transform(x, y) is not None  # type: ignore[attr-defined]
    return fit


def _log_log(x: float, y: float) -> Optional[tuple[float, float]]:
    return (math.log(x), math.log(y)) if x > 0 and y > 0 and math.isfinite(y) else None


def _log2_x(x: float, y: float) -> Optional[tuple[float, float]]:
    return (math.log2(x), y) if x > 0 and math.isfinite(y) else None


def _squared_x_log_y(x: float, y: float) -> Optional[tuple[float, float]]:
    return (x * x, math.log(y)) if y > 0 and math.isfinite(y) else None


def power_law_interval(values: Values, **kwargs) -> Interval:
    """Slope b of log y = a + b·log x with its bootstrap interval (points with y ≤ 0 dropped per draw)."""
    seeds = all_seeds(values)
    return _bootstrap_over_seeds_or_points(_fitter(_log_log), lambda s: seed_means(values, s), seeds, **kwargs)


def excess_power_law_interval(values: Values, reference: Mapping[Hashable, float], **kwargs) -> Interval:
    """Slope b of log(y_x − y_ref) against log x, where y_ref (e.g. the N = ∞ loss) has its own seeds.

    Each draw of seeds averages both the points and the reference over the same drawn seeds, so the
    reference's own seed noise is inside the interval. Points whose excess is ≤ 0 in a draw drop out of
    that draw's fit (their logarithm does not exist)."""
    seeds = all_seeds(values, {0.0: reference})

    def excess_means(sample: Sequence[Hashable]) -> dict[float, float]:
        ref = [reference[s] for s in sample if s in reference]
        if not ref:
            return {}
        base = sum(ref) / len(ref)
        return {x: y - base for x, y in seed_means(values, sample).items()}

    return _bootstrap_over_seeds_or_points(_fitter(_log_log), excess_means, seeds, **kwargs)


def per_doubling_interval(values: Values, **kwargs) -> Interval:
    """Slope of y against log2 x (the change of y per doubling of x) with its bootstrap interval."""
    seeds = all_seeds(values)
    return _bootstrap_over_seeds_or_points(_fitter(_log2_x), lambda s: seed_means(values, s), seeds, **kwargs)


def squared_rate_interval(values: Values, **kwargs) -> Interval:
    """Slope of log y against x² (for err against Δ: theory −1/8) with its bootstrap interval."""
    seeds = all_seeds(values)
    return _bootstrap_over_seeds_or_points(_fitter(_squared_x_log_y), lambda s: seed_means(values, s), seeds,
                                           **kwargs)


def verdict(interval: Interval, threshold: float, strict: bool = False) -> str:
    """PASS if the whole interval is ≤ threshold (< with strict), FAIL if the whole interval is above it
    (≥ with strict), INCONCLUSIVE if it straddles, NOT ENOUGH DATA if there is no interval."""
    if not interval.ok:
        return NO_DATA
    if interval.high < threshold or (not strict and interval.high == threshold):
        return PASS
    if interval.low > threshold or (strict and interval.low == threshold):
        return FAIL
    return INCONCLUSIVE
