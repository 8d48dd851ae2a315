"""Slope fits with their intervals: the arithmetic behind the report's checks (numpy; intervals by resample.py).

Every check of the report is a slope with a 95% interval, compared with a threshold from the theory:

- sample complexity: b in log(test loss_N − test loss_∞) = a + b·log N, checked against b ≤ −1/2 (and the
  exponent of a free-asymptote fit L_N = L_∞ + a·N^b, see `asymptote_fit`);
- depth / heads: the change of err per doubling of L (or M), checked against < 0;
- separation: the slope of log err against Δ², checked against ≤ −1/8.

Observations are held as `values[x][seed] = y` (one number per point and seed), or as
`resample.Observations`, which adds the per-episode figures behind each value. How the interval is made
depends on what the data hold (resample.py): with ≥ 5 seeds a bootstrap that resamples seeds and, where the
runs saved them, the eval episodes within each, its percentile interval expanded to Student t; with 2–4
seeds a t interval over the per-seed estimates (a bootstrap of 2 seeds has three distinct draws); with 1 seed
no interval at all (NOT ENOUGH DATA).

A fit whose points cannot all be transformed (e.g. a logarithm of an excess ≤ 0) has no value: points never
drop out of a draw silently. A bootstrap with too many such draws has no interval (the note says why).
"""
from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import Callable, Hashable, Mapping, Optional, Sequence, Union

import numpy as np

from emformer.train.report.resample import (LEVEL, MIN_SEEDS_FOR_BOOTSTRAP, N_BOOT, NO_INTERVAL, Interval,
                                           Observations, Values, resample, resample_one, t_interval)

PASS, FAIL, INCONCLUSIVE, NO_DATA = "PASS", "FAIL", "INCONCLUSIVE", "NOT ENOUGH DATA"
Data = Union[Values, Observations]
"""what a fit helper takes: seed-level values[x][seed], or Observations (with per-episode figures)"""


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


def log_log_slope(pairs: Pairs) -> Optional[float]:
    """Slope of log y against log x (no fit when some y ≤ 0)."""
    return _fitter(_log_log)(pairs)


def per_doubling_slope(pairs: Pairs) -> Optional[float]:
    """Slope of y against log2 x: the change of y per doubling of x."""
    return _fitter(_log2_x)(pairs)


def squared_rate_slope(pairs: Pairs) -> Optional[float]:
    """Slope of log y against x² (no fit when some y ≤ 0)."""
    return _fitter(_squared_x_log_y)(pairs)


def observations(data: Data, key: str = "y") -> tuple[Observations, str]:
    """(Observations, the key its values sit under) for either kind of input."""
    if isinstance(data, Observations):
        keys = list(data.rows)
        return data, (key if key in data.rows else keys[0] if len(keys) == 1 else key)
    return Observations.of({key: data}), key


def _interval_of_fit(fit: Callable[[Pairs], Optional[float]], data: Data, **kwargs) -> Interval:
    obs, key = observations(data)
    return resample_one(lambda tables, sample: fit(sorted(seed_means(tables.get(key, {}), sample).items())), obs,
                        **kwargs)


def power_law_interval(values: Data, **kwargs) -> Interval:
    """Slope b of log y = a + b·log x with its interval over seeds (no fit when some y ≤ 0)."""
    return _interval_of_fit(log_log_slope, values, **kwargs)


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
    fit = log_log_slope
    obs = Observations.of({"y": values, "ref": {0.0: reference}})

    def statistic(tables: Mapping[str, Values], sample: Sequence[Hashable]) -> Optional[float]:
        ref = tables.get("ref", {}).get(0.0, {})
        return fit(sorted((x, y) for x, y in excess_means(tables.get("y", {}), ref, sample).items() if x in keep))

    return resample_one(statistic, obs, **kwargs)


ASYMPTOTE_EXPONENTS = np.linspace(-8.0, -0.0025, 3200)
"""the grid of b for `asymptote_fit` (steps of 0.0025: finer than any interval the report prints).

Why these ends: at b = −8 the term a·N^b falls 256-fold per doubling of N, so every N past the smallest sits
on L_∞ within any noise a study has: steeper exponents describe the same data (one point above a flat line)
and cannot be told apart. At b → 0 there is no decay (L_∞ and a trade off without limit). A best fit at
either end is therefore not an estimate of b (`asymptote_interval` marks it unidentified). The lower end is
far below any slope a study resolves, so an interval that reaches it is censored there, not measured: the
grid must not be narrowed to where the estimates happen to lie."""


@functools.lru_cache(maxsize=64)
def _asymptote_design(x: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(z = x^b on the grid [B, n], its row means, z centred, the clipped sum of its squares): the part of the
    fit that depends on the x only, which every bootstrap draw of a study shares (read-only arrays)."""
    z = np.asarray(x)[None, :] ** ASYMPTOTE_EXPONENTS[:, None]
    zm = z.mean(1, keepdims=True)
    centred = z - zm
    spread = np.maximum((centred ** 2).sum(1), 1e-300)
    for array in (z, zm, centred, spread):
        array.setflags(write=False)
    return z, zm, centred, spread


def asymptote_fit(xs: Sequence[float], ys: Sequence[float]) -> Optional[tuple[float, float, float]]:
    """Least-squares (L_∞, a, b) of y = L_∞ + a·x^b with L_∞ free; None with < 3 points or no decay (a ≤ 0).

    For fixed b the model is linear in (L_∞, a), so the residual is profiled over b on a grid (vectorised:
    the bootstrap refits thousands of times) and the best grid value is the fit."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(x) < 3 or len(set(x.tolist())) < 3 or not np.all(np.isfinite(y)) or np.any(x <= 0):
        return None
    scale = x.min()  # x / min(x) keeps x^b within [small, 1] for every b of the grid
    z, zm, centred, spread = _asymptote_design(tuple((x / scale).tolist()))
    ym = y.mean()
    a = (centred * (y - ym)).sum(1) / spread
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


def asymptote_interval(values: Data, **kwargs) -> Interval:
    """Exponent b of y = L_∞ + a·x^b (L_∞ fitted) with its interval over seeds.

    When the fit the estimate rests on (all seeds' means; each seed's own with a t interval) is at an end of
    the grid, the residual still falls beyond it: the data do not identify b, and a PASS on "b ≤ −1/2" would
    rest on the grid's end, not on the data. The interval is kept (with its method) and marked unidentified,
    which makes its verdict INCONCLUSIVE. Bootstrap draws at an end only censor that tail of the interval:
    a percentile inside the grid is the same whatever lies beyond the end, and the end facing the threshold
    (−1/2, far inside the grid) decides the verdict, so draws at an end need no other rule."""
    obs, key = observations(values)

    def statistic(tables: Mapping[str, Values], sample: Sequence[Hashable]) -> Optional[float]:
        pairs = sorted(seed_means(tables.get(key, {}), sample).items())
        fit = asymptote_fit([p[0] for p in pairs], [p[1] for p in pairs])
        return None if fit is None else fit[2]

    seeds = obs.seeds
    interval = resample_one(statistic, obs, **kwargs)
    bases = [[s] for s in seeds] if interval.method == "t" else [seeds]
    hits = [b for b in (statistic(obs.rows, base) for base in bases) if b is not None and at_grid_bound(b)]
    if hits:
        return replace(interval, unidentified=f"at the bound of the search grid (b = {hits[0]:g}): b is not "
                                              "identified by these points")
    return interval


def per_doubling_interval(values: Data, **kwargs) -> Interval:
    """Slope of y against log2 x (the change of y per doubling of x) with its interval over seeds."""
    return _interval_of_fit(per_doubling_slope, values, **kwargs)


def squared_rate_interval(values: Data, **kwargs) -> Interval:
    """Slope of log y against x² (for err against Δ: theory −1/8) with its interval over seeds."""
    return _interval_of_fit(squared_rate_slope, values, **kwargs)


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
