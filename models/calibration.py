"""P(k | X) for n_clusters="auto": the count head, calibrated, and the evidence of a maximum-likelihood fit.

Two experts vote on k. The count head reads k off the pooled point tokens and the covariance spectrum; the
BIC of a Gaussian mixture fitted at each k reads it off the likelihood. Each is right where the other fails:
the BIC is near certain and near always right on many points of Gaussian clusters, and wrong with the same
certainty on few points or on shapes its model lacks (Student-t tails, per-axis noise), where the head, trained
on those shapes, is better. A posterior proportional to exp(logit / T − λ · BIC / 2) cannot be both: one
confidently wrong BIC costs its likelihood without bound, so a weight fitted by maximum likelihood shrinks
until the BIC no longer decides even where it is right. So P(k | X) is a mixture of the two, its share set by
the number of points:

    P(k | X) = w(n) · softmax_k(−λ · BIC_k / 2) + (1 − w(n)) · softmax_k(logit_k / T),
    w(n) = sigmoid(a + b · (log n − log N_REF)),     BIC_k = −2 n ℓ_k + (k d + k) log n

where ℓ_k is the mean log-likelihood per point of the tied spherical mixture (one variance shared by the
clusters: per-cluster variances let a cluster of a few points collapse and the BIC over-count) that EM fits at
k (`Clusterer._k_evidence`), d the coordinates with spread. A wrong expert costs at most −log of the other's
share, so the fit can keep the BIC sharp where it is reliable. w = 0 is the temperature-scaled count head
alone (Guo et al. 2017: one T fixes the confidence without moving the argmax). The export fits (T, λ, a, b)
by maximum likelihood on the run's eval set and measures the expected calibration error on its test set
(train/export/command.py); the Clusterer applies what its config.json holds.
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
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


N_REF = 256
"""the n at which w(n) = sigmoid(a): the middle of the task's n range on a log scale, so a and b are fitted
nearly independently"""


@dataclasses.dataclass(frozen=True)
class KPosterior:
    """The numbers of P(k | X) (module doc), as config.json's count_head holds them. The defaults are the
    count head's own softmax (T = 1, no BIC share)."""

    temperature: float = 1.0
    bic_weight: float = 0.0
    """λ: the sharpness of the BIC's own vote softmax(−λ · BIC / 2)"""
    bic_share: Optional[float] = None
    """a: the logit of the BIC's share at n = N_REF; None: no share (the count head alone)"""
    bic_share_per_log_n: float = 0.0
    """b: how the share's logit grows with log n"""

    def share(self, n: torch.Tensor) -> torch.Tensor:
        """w(n) [...] for point counts n [...]."""
        n = torch.as_tensor(n, dtype=torch.float64)
        if self.bic_share is None:
            return torch.zeros_like(n)
        return torch.sigmoid(self.bic_share + self.bic_share_per_log_n * (n.clamp(min=1).log() - math.log(N_REF)))

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
    only when the posterior gives the BIC a share). A k that is impossible (fewer distinct points) has logit
    −inf and BIC +inf."""
    head = torch.log_softmax(logits.double() / posterior.temperature, -1)
    if posterior.bic_share is None:
        return head
    if bics is None or n is None:
        raise ValueError("k_log_posterior: a posterior with a BIC share needs the BIC of every k and n")
    bics = bics.double()
    finite = torch.isfinite(bics)
    gap = torch.where(finite, bics - bics.masked_fill(~finite, math.inf).amin(-1, keepdim=True), 0.0)
    vote = torch.log_softmax((-posterior.bic_weight * gap / 2).masked_fill(~finite, -math.inf), -1)
    share = posterior.share(n)[..., None]
    return torch.logaddexp(torch.log(share) + vote, torch.log1p(-share) + head)


def posterior_nll(logits: torch.Tensor, bics: Optional[torch.Tensor], n: Optional[torch.Tensor],
                  target: torch.Tensor, posterior: KPosterior) -> float:
    """Mean negative log-likelihood of `target` [E] (indices into the k range) under `k_log_posterior`."""
    log_p = k_log_posterior(logits, bics, n, posterior)
    return float(-log_p.gather(1, target.long()[:, None]).mean())


def fit_k_posterior(logits: torch.Tensor, target: torch.Tensor, bics: Optional[torch.Tensor] = None,
                    n: Optional[torch.Tensor] = None) -> KPosterior:
    """The KPosterior maximising the likelihood of held-out targets [E] (indices); without `bics` the
    temperature alone (no BIC share)."""
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

    def unpack(v: np.ndarray) -> KPosterior:
        return KPosterior(float(math.exp(np.clip(v[0], *LOG_T_RANGE))), float(math.exp(np.clip(v[1], -12, 4))),
                          float(v[2]), float(v[3]))

    best = None
    # Nelder-Mead from a few starts (a sharp and a soft BIC vote, a small and an even share): the likelihood
    # of a mixture has flat stretches where one expert's share is near 0.
    for start in ([0.0, -1.0, 0.0, 0.0], [0.0, -4.0, -2.0, 0.0], [0.0, 0.0, 2.0, 0.0]):
        result = minimize(lambda v: posterior_nll(logits, bics, n, target, unpack(v)), x0=start, method="Nelder-Mead",
                          options={"xatol": 1e-4, "fatol": 1e-7, "maxiter": 4000})
        if best is None or result.fun < best.fun:
            best = result
    return unpack(best.x)


def count_figures(logits: torch.Tensor, target: torch.Tensor, posterior: KPosterior = KPosterior(),
                  bics: Optional[torch.Tensor] = None, n: Optional[torch.Tensor] = None) -> dict[str, float]:
    """k accuracy, mean confidence, ECE and NLL of `k_log_posterior` against `target` (indices)."""
    proba = k_log_posterior(logits, bics, n, posterior).exp()
    confidence, pred = proba.max(-1)
    correct = (pred == target.long()).double()
    return {"k_accuracy": float(correct.mean()), "mean_confidence": float(confidence.mean()),
            "ece": expected_calibration_error(confidence.numpy(), correct.numpy()),
            "nll": posterior_nll(logits, bics, n, target, posterior)}
