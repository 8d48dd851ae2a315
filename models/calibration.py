"""P(k | X) for n_clusters="auto": the count head, calibrated, and the evidence of a maximum-likelihood fit.

Two experts vote on k. The count head reads k off the pooled point tokens and the covariance spectrum; the
BIC of a Gaussian mixture fitted at each k reads it off the likelihood. Each is right where the other fails:
the BIC is near certain and near always right on many points of Gaussian clusters, and wrong with the same
certainty on few points or on shapes its model lacks (Student-t tails, per-axis noise), where the head, trained
on those shapes, is better. P(k | X) pools them log-linearly (a product of experts), the BIC's vote floored:

    log P(k | X) = log_softmax_k( logit_k / T + β · log( ε(n) / K + (1 − ε(n)) · softmax_k(−λ · BIC_k / 2) ) ),
    ε(n) = sigmoid(a + b · (log n − log N_REF)),     BIC_k = −2 n ℓ_k + (k d + k) log n

where ℓ_k is the mean log-likelihood per point of the tied spherical mixture (one variance shared by the
clusters: per-cluster variances let a cluster of a few points collapse and the BIC over-count) that EM fits at
k (`Clusterer._k_evidence`), d the coordinates with spread and K the number of possible k. Where the two agree
the pool is surer than either, as their agreement warrants; the floor ε bounds what a confidently wrong BIC
costs (at most β · log(K / ε) in logit units), so the fit can keep the BIC sharp where it is reliable. (A
posterior ∝ exp(logit / T − λ · BIC / 2), with no floor, cannot: one confidently wrong BIC costs its likelihood
without bound and the fitted λ shrinks until the BIC decides nothing. A mixture w · BIC vote + (1 − w) · head
vote, measured before this pool, is bounded too but cannot be sure where the two agree nor unsure where they
disagree: under-confident in the one case, over-confident in the other; BENCHMARKS.md's unknown-k table.)
β = None is the temperature-scaled count head alone (Guo et al. 2017: one T fixes the confidence without
moving the argmax). The export fits (T, λ, β, a, b) by maximum likelihood on the run's eval seed (twice
the eval set's episodes) and measures the expected calibration error on its test set (train/export/command.py);
the Clusterer applies what its config.json holds.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np
import torch

ECE_BINS = 10
"""equal-width confidence bins of `expected_calibration_error`"""
LOG_T_RANGE = (-4.0, 4.0)
"""the temperatures searched: e^-4 to e^4 (a head outside this range is broken, not miscalibrated)"""


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ_b (n_b / N) |accuracy_b − confidence_b| over equal-width confidence bins: the confidence is the
    probability of the predicted class, `correct` whether the prediction was right."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    return float(_binned_ece(confidence, correct[None], bins)[0])


def _binned_ece(confidence: np.ndarray, correct: np.ndarray, bins: int) -> np.ndarray:
    """The ECE of confidences [N] against each row of outcomes `correct` [D, N]: [D]. The bins hang on the
    confidences alone, so they are the same for every row."""
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    ece = np.zeros(len(correct))
    for b in np.unique(which):
        inside = which == b
        ece += inside.mean() * np.abs(correct[:, inside].mean(1) - confidence[inside].mean())
    return ece


CALIBRATED_ECE_LEVEL = 0.95
CALIBRATED_ECE_PERCENTILE = round(100 * CALIBRATED_ECE_LEVEL)
"""the level as the percentile the bench's table and the model card name"""
CALIBRATED_ECE_DRAWS = 2000


def calibrated_ece_quantile(confidence: np.ndarray, level: float = CALIBRATED_ECE_LEVEL,
                            draws: int = CALIBRATED_ECE_DRAWS, seed: int = 0) -> float:
    """The `level` quantile of the ECE that a perfectly calibrated predictor with these confidences shows on this
    many cases (each right with probability its confidence; `draws` simulations): an ECE below it is what
    sampling alone gives, so the data cannot tell the predictor from a calibrated one."""
    confidence = np.asarray(confidence, dtype=np.float64)
    if confidence.ndim != 1 or len(confidence) == 0 or not 0 < level < 1:
        raise ValueError(f"calibrated_ece_quantile: confidences [N], N >= 1, and a level in (0, 1) expected, got "
                         f"shape {confidence.shape} and level {level}")
    correct = np.random.default_rng(seed).random((draws, len(confidence))) < confidence
    return float(np.quantile(_binned_ece(confidence, correct.astype(np.float64), ECE_BINS), level))


N_REF = 256
"""the n at which ε(n) = sigmoid(a): the middle of the task's n range on a log scale, so a and b are fitted
nearly independently"""


@dataclasses.dataclass(frozen=True)
class KPosterior:
    """The numbers of P(k | X) (module doc), as config.json's count_head holds them. The defaults are the
    count head's own softmax (T = 1, no BIC in the pool)."""

    temperature: float = 1.0
    bic_weight: float = 0.0
    """λ: the sharpness of the BIC's own vote softmax(−λ · BIC / 2)"""
    bic_pool: Optional[float] = None
    """β: the weight of the BIC's floored vote in the pool; None: the count head alone"""
    bic_floor: float = 0.0
    """a: the logit of the floor ε at n = N_REF"""
    bic_floor_per_log_n: float = 0.0
    """b: how the floor's logit grows with log n"""

    @property
    def uses_bic(self) -> bool:
        return self.bic_pool is not None

    def floor(self, n: torch.Tensor) -> torch.Tensor:
        """ε(n) [...] for point counts n [...]: the share of the BIC's vote spread evenly over the possible k."""
        n = torch.as_tensor(n, dtype=torch.float64)
        return torch.sigmoid(self.bic_floor + self.bic_floor_per_log_n * (n.clamp(min=1).log() - math.log(N_REF)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def bic(log_likelihood: torch.Tensor, n: torch.Tensor, d: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """BIC of tied spherical k-mixtures: mean log-likelihood per point [..., K] of n points [...] in d
    coordinates [...], for the k of `ks` [K] (k d means, one variance, k − 1 weights)."""
    n, d = n.double()[..., None], d.double()[..., None]
    ks = ks.double()
    return -2 * n * log_likelihood.double() + (ks * d + ks) * torch.log(n)


def k_log_posterior(logits: torch.Tensor, bics: Optional[torch.Tensor], n: Optional[torch.Tensor],
                    posterior: KPosterior) -> torch.Tensor:
    """log P(k | X) [..., K] from count logits, the BIC of each k and the point counts n [...] (both needed
    only when the posterior pools the BIC). A k that is impossible (fewer distinct points) has logit −inf and
    BIC +inf."""
    head = logits.double() / posterior.temperature
    if not posterior.uses_bic:
        return torch.log_softmax(head, -1)
    if bics is None or n is None:
        raise ValueError("k_log_posterior: a posterior that pools the BIC needs the BIC of every k and n")
    bics = bics.double()
    finite = torch.isfinite(bics)
    gap = torch.where(finite, bics - bics.masked_fill(~finite, math.inf).amin(-1, keepdim=True), 0.0)
    vote = torch.log_softmax((-posterior.bic_weight * gap / 2).masked_fill(~finite, -math.inf), -1)
    floor = posterior.floor(n)[..., None]
    possible = finite.sum(-1, keepdim=True).clamp(min=1).double()
    floored = torch.logaddexp(torch.log(floor) - torch.log(possible), torch.log1p(-floor) + vote)
    # an impossible k is masked after the weighting: β = 0 times its −inf would be nan
    pooled = head + posterior.bic_pool * floored.masked_fill(~finite, 0.0)
    return torch.log_softmax(pooled.masked_fill(~finite, -math.inf), -1)


def posterior_nll(logits: torch.Tensor, bics: Optional[torch.Tensor], n: Optional[torch.Tensor],
                  target: torch.Tensor, posterior: KPosterior) -> float:
    """Mean negative log-likelihood of `target` [E] (indices into the k range) under `k_log_posterior`."""
    log_p = k_log_posterior(logits, bics, n, posterior)
    return float(-log_p.gather(1, target.long()[:, None]).mean())


def fit_k_posterior(logits: torch.Tensor, target: torch.Tensor, bics: Optional[torch.Tensor] = None,
                    n: Optional[torch.Tensor] = None) -> KPosterior:
    """The KPosterior maximising the likelihood of held-out targets [E] (indices); without `bics` the
    temperature alone (no BIC in the pool)."""
    from scipy.optimize import minimize, minimize_scalar

    if logits.ndim != 2 or target.shape != logits.shape[:1] or len(target) < 2 or (
            bics is not None and (bics.shape != logits.shape or n is None or tuple(n.shape) != tuple(target.shape))):
        raise ValueError(f"fit_k_posterior: logits [E, K] (and BICs [E, K] with n [E]) and targets [E] with E >= 2 "
                         f"expected, got {tuple(logits.shape)}, {None if bics is None else tuple(bics.shape)}, "
                         f"{None if n is None else tuple(n.shape)} and {tuple(target.shape)}")
    if bics is None:
        result = minimize_scalar(lambda log_t: posterior_nll(logits, None, None, target, KPosterior(math.exp(log_t))),
                                 bounds=LOG_T_RANGE, method="bounded", options={"xatol": 1e-4})
        return KPosterior(float(math.exp(result.x)))

    def unpack(v: np.ndarray) -> KPosterior:  # log T, log λ, log β, a, b
        return KPosterior(float(math.exp(np.clip(v[0], *LOG_T_RANGE))), float(math.exp(np.clip(v[1], -12, 4))),
                          float(math.exp(np.clip(v[2], -12, 4))), float(np.clip(v[3], -30, 30)),
                          float(np.clip(v[4], -30, 30)))

    best = None
    # Nelder-Mead from a few starts (a sharp and a soft BIC vote, a low and a high floor): the likelihood has
    # flat stretches where the floor is near 0 or 1.
    for start in ([0.0, -1.0, 0.0, -2.0, 0.0], [0.0, -3.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, -4.0, 0.0],
                  [0.0, -1.0, 0.0, 2.0, 0.0]):
        result = minimize(lambda v: posterior_nll(logits, bics, n, target, unpack(v)), x0=start, method="Nelder-Mead",
                          options={"xatol": 1e-4, "fatol": 1e-7, "maxiter": 5000})
        if best is None or result.fun < best.fun:
            best = result
    return unpack(best.x)


def count_figures(logits: torch.Tensor, target: torch.Tensor, posterior: KPosterior = KPosterior(),
                  bics: Optional[torch.Tensor] = None, n: Optional[torch.Tensor] = None) -> dict[str, float]:
    """k accuracy, mean confidence, ECE and NLL of `k_log_posterior` against `target` (indices), and the ECE a
    perfectly calibrated P(k | X) with the same confidences stays under on as many episodes
    (`calibrated_ece_quantile`): what the ECE is to be read against."""
    proba = k_log_posterior(logits, bics, n, posterior).exp()
    confidence, pred = proba.max(-1)
    correct = (pred == target.long()).double()
    return {"k_accuracy": float(correct.mean()), "mean_confidence": float(confidence.mean()),
            "ece": expected_calibration_error(confidence.numpy(), correct.numpy()),
            "ece_if_calibrated": calibrated_ece_quantile(confidence.numpy()),
            "nll": posterior_nll(logits, bics, n, target, posterior)}
