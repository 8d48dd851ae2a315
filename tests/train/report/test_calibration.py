"""The report's intervals, calibrated by simulation: studies with known truth and every source of noise the
design has, put through the very statistics and interval code the report uses.

Each simulated study has 5 seeds; a run's per-episode figure is
    truth(x) + seed noise (per config and seed) + shared episode noise (one eval set for every seed, as older
    sweeps had; common to every config, so contrasts partly cancel it) + episode noise (per run),
so an interval that resampled seeds only would miss the shared part. For each check the test prints the
coverage of its 95% intervals and the rate of a false verdict at the boundary of its claim, and asserts
coverage ≥ 93% and false verdicts ≤ 2.5%. The generator seeds are fixed, so the rates are reproducible.
"""
from __future__ import annotations

import math

import numpy as np

from emformer.train.report import checks, resample, scaling

SEEDS, EPISODES, N_BOOT = 5, 48, 300
SHARED = "one eval set"


def _observe(truth: dict[str, dict[float, float]], rng: np.random.Generator, seed_sd: float, shared_sd: float,
             episode_sd: float, row_only: dict[str, dict[float, float]] = (), row_sd: float = 0.0,
             per_seed_sets: bool = False) -> resample.Observations:
    """Observations of a simulated study: truth[key][x] per episode with the three noises; `row_only` keys
    have final-row values only (seed noise `row_sd`), as train_loss has. `per_seed_sets`: every seed its own
    eval set (today's design), else one set for all."""
    obs = resample.Observations()
    sets = range(SEEDS) if per_seed_sets else [SHARED]
    shared = {(key, g): rng.normal(0, 1, EPISODES) for key in truth for g in sets}  # common to all configs
    for key, by_x in truth.items():
        for x, mean in by_x.items():
            specific = {g: rng.normal(0, 1, EPISODES) for g in sets}  # this config's reading of the episodes
            for seed in range(SEEDS):
                g = seed if per_seed_sets else SHARED
                episodes = (mean + seed_sd * rng.normal() + shared_sd * (shared[(key, g)] + specific[g])
                            + episode_sd * rng.normal(0, 1, EPISODES))
                obs.add(key, x, seed, float(episodes.mean()), episodes, g)
    for key, by_x in dict(row_only).items():
        for x, mean in by_x.items():
            for seed in range(SEEDS):
                obs.add(key, x, seed, mean + row_sd * rng.normal())
    return obs


def _rates(name: str, draws: list[tuple[bool, bool]]) -> tuple[float, float]:
    covered = sum(c for c, _ in draws) / len(draws)
    false = sum(f for _, f in draws) / len(draws)
    print(f"{name}: coverage of the 95% interval {covered:.3f}, false verdict at the boundary {false:.3f} "
          f"({len(draws)} simulated studies)")
    return covered, false


# ------------------------------------------------------------------------------------------- depth / heads
XS = [1.0, 2.0, 4.0, 8.0]


def _trend_study(relative: float, rng: np.random.Generator, per_seed_sets: bool = False
                 ) -> tuple[resample.Observations, float]:
    level = 0.07
    err = {x: level * (1 + relative * math.log2(x)) for x in XS}
    truth = relative * level / float(np.mean(list(err.values())))  # slope / mean err of the truth
    return _observe({"err": err}, rng, seed_sd=0.0012, shared_sd=0.008, episode_sd=0.004,
                    per_seed_sets=per_seed_sets), truth


def test_depth_and_heads_intervals_cover_and_no_effect_is_never_read_as_a_fall(capsys):
    rng = np.random.default_rng(11)
    at_zero, at_margin = [], []
    margin = checks.DEFAULT_SMALLEST_EFFECT
    for _ in range(120):
        obs, truth = _trend_study(0.0, rng)
        fit = resample.resample(checks.trend_slopes, obs, n_boot=N_BOOT)["relative"]
        at_zero.append((fit.low <= truth <= fit.high, checks.equivalence_verdict(fit, margin) == checks.FALLS))
        obs, truth = _trend_study(-margin, rng)
        fit = resample.resample(checks.trend_slopes, obs, n_boot=N_BOOT)["relative"]
        at_margin.append((fit.low <= truth <= fit.high, checks.equivalence_verdict(fit, margin) == checks.NO_EFFECT))
    with capsys.disabled():
        zero = _rates("depth/heads at zero effect (false FALLS)", at_zero)
        edge = _rates(f"depth/heads at an effect of the margin, -{margin:g} (false NO EFFECT)", at_margin)
    assert zero[0] >= 0.93 and edge[0] >= 0.93
    assert zero[1] <= 0.025 and edge[1] <= 0.025


def test_with_one_eval_set_per_seed_the_interval_is_the_seeds_t_interval(capsys):
    """Today's design: the episodes' noise differs from seed to seed, so it is inside the seeds' spread and
    the episode draws add (close to) nothing: the interval is the t interval, neither narrower nor wider."""
    rng = np.random.default_rng(15)
    draws = []
    for _ in range(120):
        obs, truth = _trend_study(0.0, rng, per_seed_sets=True)
        fit = resample.resample(checks.trend_slopes, obs, n_boot=N_BOOT)["relative"]
        draws.append((fit.low <= truth <= fit.high, checks.equivalence_verdict(fit, checks.DEFAULT_SMALLEST_EFFECT)
                      == checks.FALLS))
    with capsys.disabled():
        covered, false = _rates("depth/heads at zero effect, one eval set per seed (false FALLS)", draws)
    assert 0.93 <= covered <= 0.99 and false <= 0.025


def test_resampling_the_seeds_alone_would_under_cover_the_same_studies(capsys):
    """The teeth of the test above: the shared eval set's noise is invisible to a seed-only bootstrap."""
    rng = np.random.default_rng(12)
    hits = []
    for _ in range(80):
        obs, truth = _trend_study(0.0, rng)
        seeds_only = resample.Observations(rows=obs.rows)
        fit = resample.resample(checks.trend_slopes, seeds_only, n_boot=N_BOOT)["relative"]
        hits.append((fit.low <= truth <= fit.high, False))
    with capsys.disabled():
        covered, _ = _rates("depth/heads, seeds resampled alone (the old interval)", hits)
    assert covered < 0.9


# ------------------------------------------------------------------------------------------- separation
DELTAS = [3.0, 4.0, 5.0, 6.0]


def _separation_study(slope: float, ratio_slope: float, rng: np.random.Generator) -> resample.Observations:
    oracle = {d: 0.4 * math.exp(slope * d * d) for d in DELTAS}
    model = {d: oracle[d] * 1.05 * math.exp(ratio_slope * d * d) for d in DELTAS}
    # noise proportional to the level, as a rate's is
    obs = resample.Observations()
    for key, by_d in (("err", model), ("err_oracle", oracle)):
        part = _observe({key: {d: 1.0 for d in DELTAS}}, rng, seed_sd=0.01, shared_sd=0.05, episode_sd=0.1)
        for d, mean in by_d.items():
            for seed, value in part.rows[key][d].items():
                obs.add(key, d, seed, value * mean, part.episodes[(key, d, seed)] * mean, SHARED)
    return obs


def test_separation_intervals_cover_and_the_boundary_rates_are_rarely_passed(capsys):
    rng = np.random.default_rng(13)
    resolution = {d: 0.0 for d in DELTAS}
    rate, ratio = [], []
    for _ in range(120):
        obs = _separation_study(checks.RATE_SLOPE, 0.0, rng)  # exactly at the minimax slope: must not PASS
        fit = resample.resample(lambda t, s: checks.separation_slopes(t, s, resolution), obs, n_boot=N_BOOT)
        rate.append((fit["slope"].low <= checks.RATE_SLOPE <= fit["slope"].high,
                     scaling.verdict(fit["slope"], checks.RATE_SLOPE) == scaling.PASS))
        obs = _separation_study(-0.14, checks.RATIO_MARGIN, rng)  # falls behind the oracle by the margin
        fit = resample.resample(lambda t, s: checks.separation_slopes(t, s, resolution), obs, n_boot=N_BOOT)
        ratio.append((fit["ratio"].low <= checks.RATIO_MARGIN <= fit["ratio"].high,
                      scaling.verdict(fit["ratio"], checks.RATIO_MARGIN) == scaling.PASS))
    with capsys.disabled():
        a = _rates("separation slope at -1/8 (false PASS)", rate)
        b = _rates(f"separation ratio slope at +{checks.RATIO_MARGIN:g} (false PASS)", ratio)
    assert a[0] >= 0.93 and b[0] >= 0.93
    assert a[1] <= 0.025 and b[1] <= 0.025


# ------------------------------------------------------------------------------------------- sample complexity
SIZES = [512.0, 1024.0, 2048.0, 4096.0, 8192.0]


def _complexity_study(b: float, rng: np.random.Generator) -> resample.Observations:
    l_inf, a = 0.17, 0.5 * 512 ** -b  # excess 0.5 at the smallest N
    loss = {n: l_inf + a * n ** b for n in SIZES}
    loss[math.inf] = l_inf
    train = {n: loss[n] - 0.3 * n ** -0.5 for n in SIZES}
    train[math.inf] = l_inf - 0.002
    obs = _observe({"loss": loss, "loss_init": {math.inf: 0.5}}, rng, seed_sd=0.0004, shared_sd=0.0015,
                   episode_sd=0.004, row_only={"train_loss": train}, row_sd=0.0004)
    return obs


def test_sample_complexity_intervals_cover_and_the_paper_s_bound_is_rarely_passed(capsys):
    rng = np.random.default_rng(14)
    covered: dict[str, list[tuple[bool, bool]]] = {"all": [], "upper": [], "asymptote": []}
    combined = []
    for _ in range(80):
        obs = _complexity_study(checks.SAMPLE_COMPLEXITY_BOUND, rng)
        fit, intervals = checks.complexity_intervals(obs, SIZES, n_boot=N_BOOT)
        for name in covered:
            one = intervals[name]
            covered[name].append((one.low <= checks.SAMPLE_COMPLEXITY_BOUND <= one.high,
                                  scaling.verdict(one, checks.SAMPLE_COMPLEXITY_BOUND) == scaling.PASS))
        verdict, _ = checks.combined_verdict([intervals[n] for n in ("all", "upper", "asymptote")], fit.fitted)
        combined.append((True, verdict == scaling.PASS))
    with capsys.disabled():
        rates = {name: _rates(f"sample complexity, b from {name} at b = -1/2 (false PASS)", draws)
                 for name, draws in covered.items()}
        _, false_combined = _rates("sample complexity, combined verdict at b = -1/2 (false PASS)", combined)
    assert all(cover >= 0.93 and false <= 0.025 for cover, false in rates.values()), rates
    assert false_combined <= 0.025
