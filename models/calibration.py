"""P(k | X) for n_clusters="auto": the count head, calibrated, and the evidence of the model's own fits.

The count head reads k off the pooled point tokens and the covariance spectrum; trained on the task's Δ
range, it is unsure outside it (clusters far better separated than it was trained on), where the data's own
evidence is overwhelming. So P(k | X) weighs both, with two numbers fitted on held-out episodes:

    log P(k | X) = logit_k / T − λ · BIC_k / 2 + const,   BIC_k = −2 n ℓ_k + (k d + 2k − 1) log n

where ℓ_k is the mean log-likelihood per point of the spherical mixture that EM fits at k (a few k-means++
starts, `Clusterer._k_evidence`), d the coordinates with spread. λ = 0 is the temperature-scaled count head
alone (Guo et al. 2017: one T fixes the confidence without moving the argmax); T → ∞ is BIC model selection. The export fits (T, λ) by maximum likelihood on the run's eval set and measures the
expected calibration error on its test set (train/export/command.py); the Clusterer applies the pair its
config.json holds.
"""
from __future__ import annotations

import math
from typing import Optional

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


def bic(log_likelihood: torch.Tensor, n: torch.Tensor, d: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """BIC of spherical k-mixtures: mean log-likelihood per point [..., K] of n points [...] in d coordinates
    [...], for the k of `ks` [K] (k d means, k variances, k − 1 weights)."""
    n, d = n.double()[..., None], d.double()[..., None]
    ks = ks.double()
    return -2 * n * log_likelihood.double() + (ks * d + 2 * ks - 1) * torch.log(n)


def k_log_posterior(logits: torch.Tensor, bics: Optional[torch.Tensor], temperature: float,
                    bic_weight: float) -> torch.Tensor:
    """log P(k | X) [..., K] from count logits and (with bic_weight > 0) the BIC of each k (module doc)."""
    score = logits.double() / temperature
    if bic_weight:
        if bics is None:
            raise ValueError("k_log_posterior: bic_weight > 0 needs the BIC of every k")
        score = score - bic_weight * (bics.double() - bics.double().amin(-1, keepdim=True)) / 2
    return torch.log_softmax(score, -1)


def posterior_nll(logits: torch.Tensor, bics: Optional[torch.Tensor], target: torch.Tensor, temperature: float,
                  bic_weight: float) -> float:
    """Mean negative log-likelihood of `target` [E] (indices into the k range) under `k_log_posterior`."""
    log_p = k_log_posterior(logits, bics, temperature, bic_weight)
    return float(-log_p.gather(1, target.long()[:, None]).mean())


def fit_k_posterior(logits: torch.Tensor, target: torch.Tensor, bics: Optional[torch.Tensor] = None
                    ) -> tuple[float, float]:
    """(T, λ) maximising the likelihood of held-out targets; without `bics` λ = 0 and T alone is fitted."""
    from scipy.optimize import minimize, minimize_scalar

    if logits.ndim != 2 or target.shape != logits.shape[:1] or len(target) < 2 or (
            bics is not None and bics.shape != logits.shape):
        raise ValueError(f"fit_k_posterior: logits [E, K] (and BICs [E, K]) and targets [E] with E >= 2 expected, "
                         f"got {tuple(logits.shape)}, {None if bics is None else tuple(bics.shape)} and "
                         f"{tuple(target.shape)}")
    if bics is None:
        result = minimize_scalar(lambda log_t: posterior_nll(logits, None, target, math.exp(log_t), 0.0),
                                 bounds=LOG_T_RANGE, method="bounded", options={"xatol": 1e-4})
        return float(math.exp(result.x)), 0.0
    result = minimize(lambda v: posterior_nll(logits, bics, target, math.exp(v[0]), math.exp(v[1])),
                      x0=[0.0, -2.0], method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-7, "maxiter": 2000})
    return float(math.exp(result.x[0])), float(math.exp(result.x[1]))


def count_figures(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
                  bics: Optional[torch.Tensor] = None, bic_weight: float = 0.0) -> dict[str, float]:
    """k accuracy, mean confidence, ECE and NLL of `k_log_posterior` against `target` (indices)."""
    proba = k_log_posterior(logits, bics, temperature, bic_weight).exp()
    confidence, pred = proba.max(-1)
    correct = (pred == target.long()).double()
    return {"k_accuracy": float(correct.mean()), "mean_confidence": float(confidence.mean()),
            "ece": expected_calibration_error(confidence.numpy(), correct.numpy()),
            "nll": posterior_nll(logits, bics, target, temperature, bic_weight)}
