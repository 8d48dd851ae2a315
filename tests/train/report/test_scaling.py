"""The slope fits and bootstrap intervals behind the report's checks (pure numpy, fast)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from emformer.train.report import checks, resample, scaling


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


def power_law_slope(xs, ys):
    """(b, a) of log y = a + b·log x by least squares (scaling.line_slope on the logarithms)."""
    return scaling.line_slope([math.log(x) for x in xs], [math.log(y) for y in ys])


def test_power_law_slope_is_exact_on_a_clean_power_law():
    xs = [2.0 ** i for i in range(8, 14)]
    b, a = power_law_slope(xs, [5.0 * x ** -0.75 for x in xs])
    assert b == pytest.approx(-0.75, abs=1e-9)
    assert a == pytest.approx(math.log(5.0), abs=1e-9)


@pytest.mark.parametrize("exponent", [-1.0, -0.5, -0.3])
def test_excess_slope_recovers_a_known_exponent_and_the_interval_covers_it(exponent):
    values, reference = _synthetic_excess(exponent, seeds=5, noise=0.1)
    interval = scaling.excess_power_law_interval(values, reference, n_boot=500)
    assert interval.method == "seed bootstrap" and interval.n_seeds == 5
    assert interval.label == "95% seed bootstrap t (5 seeds, 500 draws; eval episodes not resampled)"
    assert interval.estimate == pytest.approx(exponent, abs=0.08)
    assert interval.low <= exponent <= interval.high
    assert interval.high - interval.low < 0.3


def test_the_interval_method_follows_the_number_of_seeds():
    for seeds, method, label in ((2, "t", "95% t (2 seeds)"), (4, "t", "95% t (4 seeds)"),
                                 (5, "seed bootstrap", "95% seed bootstrap t (5 seeds, 200 draws; eval episodes not resampled)")):
        values, reference = _synthetic_excess(-1.0, seeds=seeds, noise=0.1)
        interval = scaling.excess_power_law_interval(values, reference, n_boot=200)
        assert (interval.method, interval.label) == (method, label) and interval.ok
    values, reference = _synthetic_excess(-1.0, seeds=1, noise=0.1)
    single = scaling.excess_power_law_interval(values, reference)
    assert single.method == "none" and not single.ok and math.isfinite(single.estimate)
    assert scaling.verdict(single, -0.5) == scaling.NO_DATA and "NOT ENOUGH DATA" in single.label


def test_two_seeds_never_give_a_seed_bootstrap_interval():
    """A bootstrap over 2 seeds has 3 distinct draws: its interval would be the range of the 2 slopes."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        values = {float(n): {s: n ** -0.8 * math.exp(0.2 * rng.standard_normal()) for s in range(2)}
                  for n in (256, 1024, 4096)}
        interval = scaling.power_law_interval(values)
        per_seed = [power_law_slope(list(values), [values[n][s] for n in values])[0] for s in range(2)]
        assert interval.method == "t" and "bootstrap" not in interval.label
        assert interval.low < min(per_seed) and interval.high > max(per_seed)  # t with 1 dof: far wider


def test_t_interval_matches_scipy():
    interval = scaling.t_interval({0: -1.0, 1: -0.8, 2: -0.9})
    half = stats.t.ppf(0.975, 2) * np.std([-1.0, -0.8, -0.9], ddof=1) / math.sqrt(3)
    assert interval.estimate == pytest.approx(-0.9) and interval.high == pytest.approx(-0.9 + half)


def test_verdicts_follow_the_interval_against_the_threshold():
    steep, ref = _synthetic_excess(-1.0, seeds=4, noise=0.05)
    shallow, ref2 = _synthetic_excess(-0.2, seeds=4, noise=0.05)
    assert scaling.verdict(scaling.excess_power_law_interval(steep, ref), -0.5) == scaling.PASS
    assert scaling.verdict(scaling.excess_power_law_interval(shallow, ref2), -0.5) == scaling.FAIL
    pure = {float(n): {s: n ** -0.9 * (1 + 0.01 * s) for s in range(3)} for n in (256, 1024, 4096)}
    assert scaling.verdict(scaling.power_law_interval(pure), -0.5) == scaling.PASS
    straddle = scaling.Interval(-0.5, -0.7, -0.3, "t", 3)
    assert scaling.verdict(straddle, -0.5) == scaling.INCONCLUSIVE
    assert scaling.verdict(scaling.NO_INTERVAL, -0.5) == scaling.NO_DATA


def test_a_non_positive_excess_never_drops_out_silently():
    """A point whose excess is ≤ 0 has no logarithm: the fit does not exist (it is not refitted without it)."""
    values = {512.0: {0: 1.0, 1: 1.1}, 1024.0: {0: 0.8, 1: 0.7}, 2048.0: {0: 0.1, 1: 0.2}}
    interval = scaling.excess_power_law_interval(values, {0: 0.5, 1: 0.5})
    assert not interval.ok and "no fit for seed(s) 0, 1" in interval.note
    assert scaling.verdict(interval, -0.5) == scaling.NO_DATA
    # with the bootstrap: too many draws without a fit leave no interval, instead of a steeper one
    wobbly = {512.0: {s: 1.0 for s in range(5)}, 1024.0: {s: 0.6 + 0.2 * (s % 2) for s in range(5)},
              2048.0: {s: 0.5 + (0.5 if s == 0 else -0.05) for s in range(5)}}
    boot = scaling.excess_power_law_interval(wobbly, {s: 0.5 for s in range(5)}, n_boot=200)
    assert not boot.ok and "draws had no fit" in boot.note


def test_per_doubling_and_squared_rate_slopes():
    depth = {float(L): {s: 0.3 - 0.05 * math.log2(L) + 0.001 * s for s in range(3)} for L in (1, 2, 4, 8)}
    per_doubling = scaling.per_doubling_interval(depth)
    assert per_doubling.estimate == pytest.approx(-0.05, abs=1e-9)
    assert scaling.verdict(per_doubling, 0.0, strict=True) == scaling.PASS

    sep = {delta: {s: 0.7 * math.exp(-delta ** 2 / 8) * (1 + 0.01 * s) for s in range(3)} for delta in (3.0, 4.0, 5.0, 6.0)}
    rate = scaling.squared_rate_interval(sep)
    assert rate.estimate == pytest.approx(-1 / 8, abs=1e-6)
    assert rate.low <= -1 / 8 + 1e-6 and rate.high >= -1 / 8 - 1e-6


def test_the_bootstrap_is_deterministic():
    values, reference = _synthetic_excess(-0.8, seeds=5, noise=0.2)
    a = scaling.excess_power_law_interval(values, reference, n_boot=200)
    b = scaling.excess_power_law_interval(values, reference, n_boot=200)
    assert a == b


def test_the_free_asymptote_fit_recovers_l_inf_and_b():
    xs = [2.0 ** i for i in range(9, 15)]
    l_inf, a, b = scaling.asymptote_fit(xs, [0.2 + 3.0 * x ** -0.7 for x in xs])
    assert l_inf == pytest.approx(0.2, abs=1e-3) and b == pytest.approx(-0.7, abs=0.005)
    assert scaling.asymptote_fit(xs[:2], [1.0, 0.5]) is None
    assert scaling.asymptote_fit(xs, [0.2 + 1e-3 * x ** 0.5 for x in xs]) is None  # rising: no decay


# --------------------------------------------------------------------------- simulated studies
SIZES = [2.0 ** i for i in range(9, 15)]


def _simulated_study(rng, tail_slope: float, cliff: bool = False, seeds: int = 5, noise: float = 0.001):
    """Test losses of a study: L_∞ + a per-seed offset shared with that seed's fresh run (same eval set),
    + 0.08·(N/512)^b, + eval noise. With `cliff`, the first two N (outside the memorisation region) sit
    far above the tail's power law: a steep drop followed by a flat tail."""
    offset = {s: 0.01 * rng.standard_normal() for s in range(seeds)}
    law = {n: 0.08 * (n / 512) ** tail_slope for n in SIZES}
    if cliff:
        law = {n: (0.6 if i == 0 else 0.25 if i == 1 else 0.08 * (n / 2048) ** tail_slope)
               for i, n in enumerate(SIZES)}
    loss = {n: {s: 0.2 + offset[s] + law[n] + noise * rng.standard_normal() for s in range(seeds)} for n in SIZES}
    fresh = {s: 0.2 + offset[s] + noise * rng.standard_normal() for s in range(seeds)}
    return loss, fresh


def _verdict(loss, fresh, n_boot: int = 300) -> str:
    """The sample-complexity verdict of the report on these test losses (train losses equal to them and a
    high init-only loss, so no N is memorised)."""
    tables = {"loss": {**loss, math.inf: fresh}, "train_loss": {**loss, math.inf: fresh},
              "loss_init": {math.inf: {s: 10.0 for s in fresh}}}
    fit, intervals = checks.complexity_intervals(resample.Observations.of(tables), SIZES, n_boot=n_boot)
    return checks.combined_verdict([intervals[n] for n in ("all", "upper", "asymptote")], fit.fitted)[0]


def test_a_cliff_followed_by_a_flat_tail_never_passes():
    rng = np.random.default_rng(7)
    verdicts = [_verdict(*_simulated_study(rng, -0.2, cliff=True), n_boot=200) for _ in range(20)]
    assert scaling.PASS not in verdicts, verdicts


STUDIES = 50  # per true b: a rate under 0.05 allows at most 2 passes


@pytest.mark.slow
def test_simulated_studies_pass_rarely_at_b_minus_0_3_and_more_often_than_not_at_b_minus_1(capsys):
    """Power, beside the calibration of tests/train/report/test_calibration.py: at this noise the t interval
    over 5 seeds (wider than the percentile one it replaced, which covered ~84%) still passes b = −1 in most
    studies."""
    rng = np.random.default_rng(0)
    rates = {}
    for slope in (-0.3, -1.0):
        verdicts = [_verdict(*_simulated_study(rng, slope)) for _ in range(STUDIES)]
        rates[slope] = verdicts.count(scaling.PASS) / len(verdicts)
    with capsys.disabled():
        print(f"\nPASS rate over {STUDIES} simulated 5-seed studies: true b = -0.3: {rates[-0.3]:.3f}, "
              f"true b = -1.0: {rates[-1.0]:.3f}")
    assert rates[-0.3] < 0.05 and rates[-1.0] > 0.5


# --------------------------------------------------------------------------- the free asymptote at its grid's end
def _step(seeds: int) -> dict[float, dict[int, float]]:
    """The smallest N above a flat line, the rest exactly on it: every steeper b fits better, to the grid's end."""
    return {float(n): {s: 0.2 + (0.5 * (1 + 0.01 * s) if n == 512 else 0.0) for s in range(seeds)}
            for n in (512, 1024, 2048, 4096)}


def test_a_free_asymptote_at_the_bound_of_its_grid_is_inconclusive():
    boot = scaling.asymptote_interval(_step(5), n_boot=200)
    assert boot.ok and boot.estimate == scaling.ASYMPTOTE_EXPONENTS[0] and boot.high <= -0.5
    assert "at the bound of the search grid" in boot.unidentified
    assert scaling.verdict(boot, -0.5) == scaling.INCONCLUSIVE  # the interval alone would say PASS
    t = scaling.asymptote_interval(_step(3))
    assert t.method == "t" and scaling.verdict(t, -0.5) == scaling.INCONCLUSIVE
    clean = scaling.asymptote_interval({n: {s: 0.2 + 3.0 * n ** -0.7 * (1 + 0.01 * s) for s in range(5)}
                                        for n in SIZES}, n_boot=200)
    assert not clean.unidentified and scaling.verdict(clean, -0.5) == scaling.PASS


def test_an_unidentified_asymptote_makes_the_sample_complexity_verdict_inconclusive_and_says_why():
    steep = {n: {s: 0.2 + 3.0 * n ** -1.0 * (1 + 0.01 * s) for s in range(5)} for n in (512.0, 1024.0, 2048.0, 4096.0)}
    fits = (scaling.power_law_interval(steep, n_boot=200), scaling.power_law_interval(steep, n_boot=200),
            scaling.asymptote_interval(_step(5), n_boot=200))
    verdict, reason = checks.combined_verdict(fits, list(steep))
    assert verdict == scaling.INCONCLUSIVE and "free asymptote L_∞ + a·N^b INCONCLUSIVE (at the bound" in reason
