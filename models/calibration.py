"""Calibrating the count head's P(k | X) (temperature scaling, Guo et al. 2017).

A count head trained by cross-entropy is often over- or under-confident; one scalar T fitted on held-out
episodes, P(k | X) = softmax(logits / T), fixes the confidence without moving the argmax (so k accuracy is
unchanged). The export fits T on the run's eval set and measures the expected calibration error on its test
set (train/export/command.py); the Clusterer divides the count logits by the T its config.json holds.
"""
from __future__ import annotations

import math

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


def temperature_nll(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of `target` [E] (class indices) under softmax(logits [E, K] / T)."""
    log_p = torch.log_softmax(logits.double() / temperature, -1)
    return float(-log_p.gather(1, target.long()[:, None]).mean())


def fit_temperature(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The T minimising `temperature_nll` on held-out episodes (bounded 1-D search over log T)."""
    from scipy.optimize import minimize_scalar

    if logits.ndim != 2 or target.shape != logits.shape[:1] or len(target) < 2:
        raise ValueError(f"fit_temperature: logits [E, K] and targets [E] with E >= 2 expected, got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    result = minimize_scalar(lambda log_t: temperature_nll(logits, target, math.exp(log_t)),
                             bounds=LOG_T_RANGE, method="bounded", options={"xatol": 1e-4})
    return float(math.exp(result.x))


def count_figures(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> dict[str, float]:
    """k accuracy, mean confidence, ECE and NLL of softmax(logits / T) against `target` (class indices)."""
    proba = torch.softmax(logits.double() / temperature, -1)
    confidence, pred = proba.max(-1)
    correct = (pred == target.long()).double()
    return {"k_accuracy": float(correct.mean()), "mean_confidence": float(confidence.mean()),
            "ece": expected_calibration_error(confidence.numpy(), correct.numpy()),
            "nll": temperature_nll(logits, target, temperature)}
