"""The slope fits and bootstrap intervals behind the report's checks (pure numpy, fast)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from emformer.train.report import scaling


def _synthetic_excess(exponent: float, seeds: int, noise: float, rng_seed: int = 0):
    """Test loss_N = loss_∞ + C·N^exponent, with multiplicative seed noise on the excess and noise on loss_∞."""
    rng = np.random.default_rng(rng_seed)
    sizes = [512, 1024, 2048, 4096, 8192, 16384]
    loss_inf = {s: 0.20 + 1e-4 * rng.standard_normal() for s in range(seeds)}
    values = {
        float(n): {s: loss_inf[s] + 3.0 * n ** exponent * math.exp(noise * rng.standard_normal()) for s in range(seeds)}
        for n in sizes
    }
    return values, loss_inf


def test_power_law_slope_is_exact_on_a_clean_power_law():
    xs = [2.0 ** i for i in range(8, 14)]
    b, a = scaling.power_law_slope(xs, [5.0 * x ** -0.75 for x in xs])
    assert b == pytest.approx(-0.75, abs=1e-9)
    assert a == pytest.approx(math.log(5.0), abs=1e-9)


@pytest.mark.parametrize("exponent", [-1.0, -0.5, -0.3])
def test_excess_slope_recovers_a_known_exponent_and_the_interval_covers_it(exponent):
    values, reference = _synthetic_excess(exponent, seeds=5, noise=0.1)
    interval = scaling.excess_power_law_interval(values, reference, n_boot=500)
    assert interval.resampled == "seeds" and interval.n_units == 5
    assert interval.estimate == pytest.approx(exponent, abs=0.08)
    assert interval.low <= exponent <= interval.high
    assert interval.high - interval.low < 0.3


def test_verdicts_follow_the_interval_against_the_threshold():
    steep, ref = _synthetic_excess(-1.0, seeds=4, noise=0.05)
    shallow, ref2 = _synthetic_excess(-0.2, seeds=4, noise=0.05)
    assert scaling.verdict(scaling.excess_power_law_interval(steep, ref, n_boot=300), -0.5) == scaling.PASS
    assert scaling.verdict(scaling.excess_power_law_interval(shallow, ref2, n_boot=300), -0.5) == scaling.FAIL
    pure = {float(n): {s: n ** -0.9 * (1 + 0.01 * s) for s in range(3)} for n in (256, 1024, 4096)}
    assert scaling.verdict(scaling.power_law_interval(pure, n_boot=300), -0.5) == scaling.PASS
    straddle = scaling.Interval(-0.5, -0.7, -0.3, "seeds", 3, 100)
    assert scaling.verdict(straddle, -0.5) == scaling.INCONCLUSIVE
    assert scaling.verdict(scaling.NO_INTERVAL, -0.5) == scaling.NO_DATA


def test_a_single_seed_resamples_points_instead():
    values, reference = _synthetic_excess(-1.0, seeds=1, noise=0.05)
    interval = scaling.excess_power_law_interval(values, reference, n_boot=300)
    assert interval.resampled == "points (one seed)"
    assert interval.low <= interval.estimate <= interval.high


def test_non_positive_excess_points_drop_out_and_too_few_points_give_no_interval():
    values = {512.0: {0: 1.0}, 1024.0: {0: 0.1}}
    interval = scaling.excess_power_law_interval(values, {0: 0.5}, n_boot=50)  # only N=512 has excess > 0
    assert not interval.ok
    assert scaling.verdict(interval, -0.5) == scaling.NO_DATA


def test_per_doubling_and_squared_rate_slopes():
    depth = {float(L): {s: 0.3 - 0.05 * math.log2(L) + 0.001 * s for s in range(3)} for L in (1, 2, 4, 8)}
    per_doubling = scaling.per_doubling_interval(depth, n_boot=200)
    assert per_doubling.estimate == pytest.approx(-0.05, abs=1e-9)
    assert scaling.verdict(per_doubling, 0.0, strict=True) == scaling.PASS

    sep = {delta: {s: 0.7 * math.exp(-delta ** 2 / 8) * (1 + 0.01 * s) for s in range(3)} for delta in (3.0, 4.0, 5.0, 6.0)}
    rate = scaling.squared_rate_interval(sep, n_boot=200)
    assert rate.estimate == pytest.approx(-1 / 8, abs=1e-6)
    assert rate.low <= -1 / 8 + 1e-6 and rate.high >= -1 / 8 - 1e-6


def test_the_bootstrap_is_deterministic():
    values, reference = _synthetic_excess(-0.8, seeds=3, noise=0.2)
    a = scaling.excess_power_law_interval(values, reference, n_boot=200)
    b = scaling.excess_power_law_interval(values, reference, n_boot=200)
    assert a == b


def test_one_seed_with_only_two_usable_points_gives_no_zero_width_interval():
    """A point whose y ≤ 0 cannot be logged: with one seed, 2 usable points would give a [b, b] interval."""
    values = {2048.0: {0: 0.008}, 4096.0: {0: 0.0025}, 8192.0: {0: -0.0016}}
    interval = scaling.power_law_interval(values, n_boot=100)
    assert interval.estimate == pytest.approx(math.log(0.0025 / 0.008) / math.log(2))
    assert not interval.ok and scaling.verdict(interval, -0.5) == scaling.NO_DATA
