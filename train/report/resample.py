"""The two-level bootstrap behind every interval of the report: seeds, and the eval episodes within them.

A check's numbers come from runs (one per config x and seed s), each scored on an eval set of E episodes.
Two sources of noise enter every figure: the training seed, and which E episodes the eval set happened to
hold. `Observations` holds both levels: the final row's value of a key per (x, seed), and, where the run
saved them (episodes.npz), the per-episode figures behind that mean. The statistic of a check is
recomputed from scratch on every drawn table, so each data-dependent choice it makes (which points enter a
fit, a floor, a region) is made again inside each draw. Three sets of draws:

- seeds: as many seeds as there are, drawn with replacement (a seed drawn twice counts twice), each with its
  runs' values as they are. Since every seed has its own eval set (eval.seed derives from data.seed), their
  spread holds the seeds' noise and the eval noise that differs from seed to seed;
- episodes: the seeds held, the episodes of every eval set reweighted by a multinomial draw of E out of E,
  one weight vector per eval set: runs on one set (every config of one seed; every seed, in sweeps whose
  seeds share one set) get the same weights, so contrasts stay paired episode by episode and a shared
  set's noise moves every seed at once, as it did in the data;
- episodes per seed: the same with one weight vector per eval set and seed: what the episode noise would
  be if no two seeds shared a set, i.e. the part the seeds' spread already holds.

The variance of the estimate is S/(S−1)·v_seeds + S/(S−1)·E/(E−1)·max(v_episodes − v_per_seed, 0), each
bootstrap's divisors undone: the seeds' share, plus the share of eval sets common to several seeds, which no
seed draw can see (zero, up to Monte Carlo noise, when each seed has its own set; the whole set's noise,
less its 1/S part inside the seeds' spread, when every seed shares one). The interval is
estimate ± t_{S−1}·sqrt(variance): where a plain percentile interval of 5 seeds covers ~84% of the time for
a claimed 95%, this is the Student t interval; the seeds' S − 1 degrees of freedom are kept even where the
shared sets' share is the larger (a Welch–Satterthwaite ν would be larger, and under-covered in the
simulated studies of the tests, the seeds' share read off 5 seeds being too noisy to weigh). Each v is the
square of half the distance between the draws' 15.9th and 84.1th percentiles (one SD on a normal, robust
to a few wild draws); a draw without a fit counts as lying beyond either end (half each) and widens the
interval, and too many leave none. With 2–4 seeds the seeds' share is the spread of the per-seed estimates
instead (a bootstrap of 2 seeds has three distinct draws); 1 seed has no interval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import stats

Values = Mapping[float, Mapping[Hashable, float]]
"""values[x][seed] = y: one observation per point x and seed"""
Tables = Mapping[str, Values]
"""key -> values[x][seed]"""
Statistic = Callable[[Tables, Sequence[Hashable]], Union[Optional[float], Mapping[str, Optional[float]]]]
"""statistic(tables, seeds) -> a value (or name -> value), None when there is no fit; `seeds` lists the
(drawn) seeds, each a key of tables[key][x]"""

MIN_SEEDS_FOR_BOOTSTRAP = 5
N_BOOT = 2000
LEVEL = 0.95
SEEDS_ONLY, EPISODES, EPISODES_PER_SEED = "seeds", "episodes", "episodes per seed"
"""what a set of draws resamples: the seeds (episodes held); the eval episodes (seeds held), one weight vector
per eval set; or the same with one per eval set and seed, as if no two seeds shared a set"""
SPREAD = stats.norm.cdf(1.0) - stats.norm.cdf(-1.0)
"""the central share of draws whose half-widths stand for one standard deviation (68.3%)"""


@dataclass
class Observations:
    """Final-row values per (key, x, seed) and the per-episode figures behind them where a run saved them."""

    rows: dict[str, dict[float, dict[Hashable, float]]] = field(default_factory=dict)
    episodes: dict[tuple[str, float, Hashable], np.ndarray] = field(default_factory=dict)
    eval_sets: dict[tuple[str, float, Hashable], Hashable] = field(default_factory=dict)
    """(key, x, seed) -> which eval set the episodes are of: runs on one eval set share episode weights"""

    def add(self, key: str, x: float, seed: Hashable, value: float, per_episode: Optional[np.ndarray] = None,
            eval_set: Hashable = None) -> None:
        if value is None or not math.isfinite(value):
            return
        self.rows.setdefault(key, {}).setdefault(float(x), {})[seed] = float(value)
        if per_episode is not None and len(per_episode):
            self.episodes[(key, float(x), seed)] = np.asarray(per_episode, dtype=np.float64)
            self.eval_sets[(key, float(x), seed)] = eval_set if eval_set is not None else ("run", key, x, seed)

    @classmethod
    def of(cls, tables: Tables) -> "Observations":
        """Seed-level observations only (no episodes): what a sweep without episode files gives."""
        obs = cls()
        for key, values in tables.items():
            for x, by_seed in values.items():
                for seed, value in by_seed.items():
                    obs.add(key, x, seed, value)
        return obs

    @property
    def seeds(self) -> list[Hashable]:
        seen = {s for values in self.rows.values() for by_seed in values.values() for s in by_seed}
        return sorted(seen, key=repr)

    @property
    def episode_count(self) -> int:
        """Episodes per eval set (the smallest, if sets differ); 0 when no observation has them. Keys that
        have none by nature (a train loss: the row's mean over training episodes) stay as they are in the
        episode draws."""
        return min((len(a) for a in self.episodes.values()), default=0)


@dataclass(frozen=True)
class Interval:
    """A point estimate and its interval, with the method that made it."""

    estimate: float
    low: float
    high: float
    method: str
    """'two-level bootstrap', 'seed bootstrap', 't' or 'none'"""
    n_seeds: int
    n_draws: int = 0
    """bootstrap draws made (0 for t / none)"""
    note: str = ""
    """why there is no interval, when there is none"""
    level: float = LEVEL
    unidentified: str = ""
    """why the estimate is not identified by the data (e.g. at the bound of a search grid): its verdict is
    INCONCLUSIVE whatever the interval says"""
    episodes: int = 0
    """eval episodes per eval set that the episode draws resampled (0: not resampled)"""
    noise: Optional[tuple[float, float]] = None
    """(SD of the statistic over the seed draws, over the episode draws) where both were made: the share of
    each source (the report's noise budget)"""

    @property
    def ok(self) -> bool:
        return math.isfinite(self.estimate) and math.isfinite(self.low) and math.isfinite(self.high)

    def describe(self, digits: int = 2) -> str:
        if not self.ok:
            return "n/a"
        return f"[{self.low:.{digits}f}, {self.high:.{digits}f}]"

    @property
    def label(self) -> str:
        """The method, named next to every interval in the report."""
        pct = f"{100 * self.level:g}%"
        seeds = f"{self.n_seeds} seed{'s' if self.n_seeds != 1 else ''}"
        if self.method == "two-level bootstrap":
            text = f"{pct} two-level bootstrap t ({seeds} × {self.episodes} eval episodes, {self.n_draws} draws each)"
        elif self.method == "seed bootstrap":
            text = f"{pct} seed bootstrap t ({seeds}, {self.n_draws} draws; eval episodes not resampled)"
        elif self.method == "t":
            text = f"{pct} t ({seeds}" + (f"; × {self.episodes} eval episodes, {self.n_draws} draws)" if self.episodes
                                          else ")")
        else:
            text = f"no interval ({seeds})"
        return text if self.ok or not self.note else f"{text}: {self.note}"


NO_INTERVAL = Interval(math.nan, math.nan, math.nan, "none", 0, note="no fit")


def _as_dict(value: Union[Optional[float], Mapping[str, Optional[float]]]) -> dict[str, Optional[float]]:
    return dict(value) if isinstance(value, Mapping) else {"": value}


def _finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)


class _Draws:
    """The drawn tables of one set of draws (module doc): seed picks and per-eval-set episode weights."""

    def __init__(self, obs: Observations, n_boot: int, rng: np.random.Generator, mode: str) -> None:
        self.obs, self.seeds = obs, obs.seeds
        count = len(self.seeds)
        if mode == SEEDS_ONLY:
            self.picks = rng.integers(0, count, size=(n_boot, count))
        else:
            self.picks = np.tile(np.arange(count), (n_boot, 1))
        # the mean of each run's episodes under each draw's weights: [n_boot] per (key, x, seed)
        self.means: dict[tuple[str, float, Hashable], np.ndarray] = {}
        if mode == SEEDS_ONLY:
            return
        groups: dict[Hashable, list[tuple[str, float, Hashable]]] = {}
        for entry, set_id in sorted(obs.eval_sets.items(), key=lambda kv: repr(kv[0])):
            own = (set_id, entry[2]) if mode == EPISODES_PER_SEED else set_id
            groups.setdefault((own, len(obs.episodes[entry])), []).append(entry)
        for (_, size), entries in sorted(groups.items(), key=lambda kv: repr(kv[0])):
            matrix = np.stack([obs.episodes[e] for e in entries])  # [m, E]
            picks = rng.integers(0, size, size=(n_boot, size))
            # row by row: the same counts as one bincount over offset picks, without its n_boot·size temporaries
            weights = np.empty((n_boot, size))
            for b, row in enumerate(picks):
                weights[b] = np.bincount(row, minlength=size)
            weights /= size
            for entry, row in zip(entries, matrix @ weights.T):  # [m, n_boot]
                self.means[entry] = row

    def tables(self, b: int) -> tuple[dict[str, dict[float, dict[int, float]]], list[int]]:
        """Draw b as tables whose seeds are the draw's slots 0..S−1 (slot j holds the j-th drawn seed)."""
        drawn = [self.seeds[i] for i in self.picks[b]]
        out: dict[str, dict[float, dict[int, float]]] = {}
        for key, values in self.obs.rows.items():
            table = out.setdefault(key, {})
            for x, by_seed in values.items():
                row = table.setdefault(x, {})
                for slot, seed in enumerate(drawn):
                    if seed in by_seed:
                        means = self.means.get((key, x, seed))
                        row[slot] = float(means[b]) if means is not None else by_seed[seed]
        return out, list(range(len(drawn)))


def draws(statistic: Statistic, obs: Observations, mode: str, *, n_boot: int = N_BOOT,
          seed: int = 0) -> dict[str, np.ndarray]:
    """name -> the statistic's values over n_boot draws of `mode` (nan where a draw had no fit)."""
    rng = np.random.default_rng([seed, (SEEDS_ONLY, EPISODES, EPISODES_PER_SEED).index(mode)])
    drawn = _Draws(obs, n_boot, rng, mode)
    out: dict[str, list[float]] = {}
    for b in range(n_boot):
        tables, slots = drawn.tables(b)
        for name, value in _as_dict(statistic(tables, slots)).items():
            out.setdefault(name, []).append(float(value) if _finite(value) else math.nan)
    return {name: np.asarray(values) for name, values in out.items()}


def _spreads(estimate: float, values: np.ndarray) -> tuple[float, float]:
    """(below, above) the estimate: the draws' SD, read as half the distance between their 15.9th and 84.1th
    percentiles (robust to a few wild draws; one number for both sides, since each side's own percentile
    is too noisy at 5 seeds to be worth its skew); a draw without a fit lies beyond either end (half each);
    nan when those percentiles are not finite."""
    good = values[np.isfinite(values)]
    failed = len(values) - len(good)
    padded = np.concatenate([good, np.full(failed // 2, -np.inf), np.full(failed - failed // 2, np.inf)])
    if not len(padded):
        return math.nan, math.nan
    tail = 100 * (1 - SPREAD) / 2
    with np.errstate(invalid="ignore"):  # a percentile among the ±inf draws interpolates to nan
        low, high = np.percentile(padded, [tail, 100 - tail])
    spread = (float(high) - float(low)) / 2 if math.isfinite(low) and math.isfinite(high) else math.nan
    return spread, spread


def _t_half_width(variance: float, seeds: int, level: float) -> float:
    """t_{S−1} · sqrt(variance)."""
    return float(stats.t.ppf(1 - (1 - level) / 2, seeds - 1)) * math.sqrt(max(variance, 0.0))


def resample(statistic: Statistic, obs: Observations, *, n_boot: int = N_BOOT, level: float = LEVEL,
             seed: int = 0) -> dict[str, Interval]:
    """name -> Interval of each value `statistic` returns (one named "" for a plain float), made as the
    module doc says: the seeds' share from seed draws (≥ 5 seeds) or per-seed estimates (2–4), the shared
    eval sets' share from episode draws (where the runs saved their episodes); none with 1 seed."""
    seeds = obs.seeds
    if not seeds:
        return {"": NO_INTERVAL}
    estimates = _as_dict(statistic(obs.rows, seeds))
    count, episodes = len(seeds), obs.episode_count
    if count < 2:
        return {name: Interval(float(v) if _finite(v) else math.nan, math.nan, math.nan, "none", 1, 0,
                               "one seed: NOT ENOUGH DATA", level) for name, v in estimates.items()}
    bootstrap = count >= MIN_SEEDS_FOR_BOOTSTRAP
    empty = np.full(n_boot, math.nan)
    seed_draws = draws(statistic, obs, SEEDS_ONLY, n_boot=n_boot, seed=seed) if bootstrap else {}
    per_seed = [] if bootstrap else [_as_dict(statistic(obs.rows, [s])) for s in seeds]
    episode_draws = draws(statistic, obs, EPISODES, n_boot=n_boot, seed=seed) if episodes else {}
    own_draws = draws(statistic, obs, EPISODES_PER_SEED, n_boot=n_boot, seed=seed) if episodes else {}
    method = ("two-level bootstrap" if episodes else "seed bootstrap") if bootstrap else "t"
    made = dict(method=method, n_seeds=count, n_draws=n_boot if bootstrap or episodes else 0, level=level,
                episodes=episodes)
    out = {}
    for name, estimate in estimates.items():
        values = [one.get(name) for one in per_seed]
        missing = [str(s) for s, v in zip(seeds, values) if not _finite(v)]
        if missing:
            out[name] = Interval(math.nan, math.nan, math.nan, note=f"no fit for seed(s) {', '.join(missing)}", **made)
            continue
        if not _finite(estimate):
            out[name] = Interval(math.nan, math.nan, math.nan, note="no fit on all seeds", **made)
            continue
        estimate = float(estimate)
        if bootstrap:
            seed_var = [count / (count - 1) * v * v for v in _spreads(estimate, seed_draws.get(name, empty))]
        else:
            seed_var = [float(np.var(values, ddof=1) / count)] * 2
        episode_var = [0.0, 0.0]
        if episodes:
            # the share of eval sets that several seeds share: what the seed draws cannot see
            scale = count / (count - 1) * episodes / (episodes - 1)
            pairs = zip(_spreads(estimate, episode_draws.get(name, empty)), _spreads(estimate, own_draws.get(name, empty)))
            episode_var = [scale * max(a * a - b * b, 0.0) for a, b in pairs]
        if not all(math.isfinite(v) for v in (*seed_var, *episode_var)):
            out[name] = Interval(estimate, math.nan, math.nan, note="too many draws had no fit (e.g. an excess ≤ 0)",
                                 **made)
            continue
        noise = (_sd(seed_draws[name]), _sd(episode_draws[name])) if bootstrap and episodes else None
        out[name] = Interval(estimate, estimate - _t_half_width(seed_var[0] + episode_var[0], count, level),
                             estimate + _t_half_width(seed_var[1] + episode_var[1], count, level), noise=noise, **made)
    return out


def resample_one(statistic: Statistic, obs: Observations, **kwargs) -> Interval:
    """`resample` of a statistic that returns one value."""
    return resample(statistic, obs, **kwargs)[""]


def t_interval(per_seed: Mapping[Hashable, Optional[float]], level: float = LEVEL) -> Interval:
    """Student t interval (seeds − 1 dof) around the mean of per-seed estimates; none for < 2 seeds."""
    n = len(per_seed)
    missing = [s for s, v in per_seed.items() if not _finite(v)]
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


def _sd(values: np.ndarray) -> float:
    good = values[np.isfinite(values)]
    return float(good.std(ddof=1)) if len(good) > 2 else math.nan
