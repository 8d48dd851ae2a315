"""Task specs: what distribution of clustering episodes to draw (DESIGN §1).

A `TaskSpec` is a plain dataclass so that it can be a config group (`task/`) in OmegaConf structured
configs and also be built directly in Python. Ranges are expressed by an optional `*_max` field: `n=64`
alone is fixed, `n=64, n_max=128` draws n uniformly in [64, 128] and pads to 128 with a mask.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from emformer.errors import ConfigError

WEIGHT_MODES = ("uniform", "dirichlet", "range")
NOISE_MODES = ("isotropic", "diagonal", "student_t", "mixed")
MIXED_MODES = ("isotropic", "diagonal", "student_t")
"""the per-episode noise modes of task.noise = mixed, in the order of the batch's `noise_mode` codes 0, 1, 2"""
NO_INIT = "none"
"""the init mode without initial centroids (the model learns slot vectors; labels are not anchored)"""
EPISODES_VERSION = 5
"""Which episodes a (spec, seed, index) gives (data/episodes.py): bumped whenever their values change, so
that run names (train/config.py:config_hash) change with them and no run trained on older episodes is taken
for a current one (5: IEEE-exact arithmetic, the same bits on every CPU; 4: PCG64 streams; 3: Philox keyed
per block of indices; 2: per episode; 1: numpy's per-distribution methods)."""


def anchored(init: str) -> bool:
    """Whether init mode `init` gives initial centroids that the labels are anchored to (all but `none`)."""
    return init != NO_INIT


@dataclass
class TaskSpec:
    """One distribution of GMM clustering episodes. Field docs are the help text."""

    k: int = 3
    """number of clusters (the minimum when k_max is set)"""
    k_max: Optional[int] = None
    """if set, k is uniform in [k, k_max] and centroids are padded to k_max with a mask"""
    d: int = 8
    """dimension of the data"""
    d_max: Optional[int] = None
    """if set, points are zero-padded up to d_max coordinates (d itself stays fixed)"""
    d_min: Optional[int] = None
    """if set, each episode's own dimension is uniform in [d_min, d]: its coordinates beyond it are zero"""
    n: int = 128
    """points per episode (the minimum when n_max is set)"""
    n_max: Optional[int] = None
    """if set, n is uniform in [n, n_max] and points are padded to n_max with a mask"""
    n_log: bool = False
    """with n_max: n is log-uniform in [n, n_max] instead (as many episodes per doubling of n)"""
    separation: float = 4.0
    """Δ = min_{a≠b} ‖μ_a − μ_b‖ / σ, hit exactly (the minimum when separation_max is set)"""
    separation_max: Optional[float] = None
    """if set, Δ is uniform in [separation, separation_max]"""
    sigma: float = 1.0
    """noise scale σ"""
    weights: str = "uniform"
    """mixing weights: uniform | dirichlet (weights_alpha) | range (uniform in [weights_lo, weights_hi], normalised)"""
    weights_alpha: float = 1.0
    weights_lo: float = 0.5
    weights_hi: float = 2.0
    noise: str = "isotropic"
    """isotropic (σ I) | diagonal (per-axis scales σ·r, log r uniform in ±log diag_ratio) | student_t (noise_df) |
    mixed (each episode one of the three: diagonal with probability diagonal_share, student_t with
    student_t_share, else isotropic; the batch's `noise_mode` says which, for the oracle)"""
    noise_df: float = 5.0
    """degrees of freedom of Student-t noise (> 2: scaled to unit variance per axis)"""
    diag_ratio: float = 2.0
    """largest per-axis scale factor for diagonal noise"""
    diagonal_share: float = 0.25
    """task.noise = mixed: the share of episodes with diagonal noise"""
    student_t_share: float = 0.25
    """task.noise = mixed: the share of episodes with Student-t noise"""
    init: str = "noisy_truth"
    """initial centroids: a mode of data/inits.py's INITS, e.g. noisy_truth (true means + noise of relative size
    init_noise), kmeans++, spectral, or none (no initial centroids: labels are not anchored)"""
    init_noise: float = 0.3
    """ρ: noisy_truth adds Gaussian noise of expected norm ρ·Δ·σ to each true mean"""
    translate: float = 0.0
    """augmentation: each episode (points, means, init) is shifted by an offset whose coordinates are
    N(0, (translate·Δ·σ)²), so no model can learn where the origin is (0 = off: the means are centred)"""
    rotate: bool = False
    """augmentation: each episode (points, means, init) is turned by a random orthogonal matrix (Haar) within
    its first d coordinates; isotropic noise only (the oracle models per-axis noise)"""
    standardize: bool = False
    """each episode (points, means, init, noise scales; after any augmentation) is centred and divided by one
    common scale so that its mean per-coordinate variance over its own coordinates is 1: the rule the
    Clusterer applies to its input (data/standardize.py), so a model trained so sees user data as it saw its
    training data, noise scale included. Labels, Δ and the anchoring are unchanged"""

    # ------------------------------------------------------------------ derived sizes (padded shapes)
    @property
    def k_pad(self) -> int:
        return self.k_max if self.k_max is not None else self.k

    @property
    def n_pad(self) -> int:
        return self.n_max if self.n_max is not None else self.n

    @property
    def d_pad(self) -> int:
        return self.d_max if self.d_max is not None else self.d

    @property
    def padded(self) -> bool:
        """Whether episodes can carry padded points or clusters (n or k drawn from a range): with neither,
        every mask is all-true and attention can run unmasked."""
        return self.n_pad != self.n or self.k_pad != self.k

    @property
    def anchored(self) -> bool:
        """Whether episodes come with initial centroids that the labels are anchored to (init != none)."""
        return anchored(self.init)

    def validate(self, prefix: str = "task") -> "TaskSpec":
        """Raise ConfigError naming the first bad key; return self so calls chain."""

        def bad(key: str, expected: str) -> ConfigError:
            return ConfigError(f"{prefix}.{key}: expected {expected}, got {getattr(self, key)!r}")

        if self.k < 2:
            raise bad("k", "an integer >= 2")
        if self.k_max is not None and self.k_max < self.k:
            raise bad("k_max", f"null or an integer >= task.k ({self.k})")
        if self.d < 1:
            raise bad("d", "an integer >= 1")
        if self.d_max is not None and self.d_max < self.d:
            raise bad("d_max", f"null or an integer >= task.d ({self.d})")
        if self.d_min is not None and not 1 <= self.d_min <= self.d:
            raise bad("d_min", f"null or an integer in [1, task.d ({self.d})]")
        if self.n < self.k_pad:
            raise bad("n", f"an integer >= the number of clusters ({self.k_pad})")
        if self.n_max is not None and self.n_max < self.n:
            raise bad("n_max", f"null or an integer >= task.n ({self.n})")
        if not (self.separation > 0 and math.isfinite(self.separation)):
            raise bad("separation", "a finite number > 0")
        if self.separation_max is not None and not (self.separation <= self.separation_max < math.inf):
            raise bad("separation_max", f"null or a finite number >= task.separation ({self.separation})")
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise bad("sigma", "a finite number > 0")
        if self.weights not in WEIGHT_MODES:
            raise bad("weights", f"one of {', '.join(WEIGHT_MODES)}")
        if not self.weights_alpha > 0:
            raise bad("weights_alpha", "a number > 0")
        if not self.weights_lo > 0:
            raise bad("weights_lo", "a number > 0 (weights must be positive)")
        if not self.weights_hi >= self.weights_lo:
            raise bad("weights_hi", f"a number >= task.weights_lo ({self.weights_lo})")
        if self.noise not in NOISE_MODES:
            raise bad("noise", f"one of {', '.join(NOISE_MODES)}")
        if self.noise in ("student_t", "mixed") and not self.noise_df > 2:
            raise bad("noise_df", "a number > 2 (finite variance)")
        if not self.diag_ratio >= 1:
            raise bad("diag_ratio", "a number >= 1")
        for key in ("diagonal_share", "student_t_share"):
            if not 0 <= getattr(self, key) <= 1:
                raise bad(key, "a number in [0, 1]")
        if not self.diagonal_share + self.student_t_share <= 1:
            raise bad("student_t_share", f"a number <= 1 - task.diagonal_share ({self.diagonal_share}): the "
                                         "shares of the mixed noise modes add up to at most 1 (the rest isotropic)")
        # The registry's functions need torch (~2 s of CPU to import): light commands (status, sweep) import
        # TaskSpec without it.
        from emformer.data import inits

        if self.init not in inits.INITS:
            raise bad("init", f"one of {', '.join(inits.INITS)}")
        if not self.init_noise >= 0:
            raise bad("init_noise", "a number >= 0")
        if isinstance(self.translate, bool) or not (self.translate >= 0 and math.isfinite(self.translate)):
            raise bad("translate", "a finite number >= 0 (0 = off)")
        if not isinstance(self.rotate, bool):
            raise bad("rotate", "true or false")
        if not isinstance(self.standardize, bool):
            raise bad("standardize", "true or false")
        if self.rotate and self.noise != "isotropic":
            raise bad("rotate", f"false with task.noise={self.noise} (rotating per-axis noise leaves the true "
                                "model that the oracle and EM use; rotate needs task.noise=isotropic)")
        if self.d_min is not None and (self.translate or self.rotate):
            key = "translate" if self.translate else "rotate"
            raise bad(key, f"{'0' if key == 'translate' else 'false'} with task.d_min set (the augmentation "
                           "acts on all task.d coordinates, so it would move the ones beyond an episode's own d, "
                           "which must stay exactly 0; centring by task.standardize makes translation moot)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "task") -> "TaskSpec":
        """Build from a plain dict (a manifest, an export config.json), refusing unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown task key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**values).validate(where)
