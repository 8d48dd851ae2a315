"""Clustering metrics, batched over episodes with padding masks (DESIGN §3).

Every function takes a batch and returns one value per episode ([B], float32), so callers can average,
bootstrap or take standard errors as they like. Points with mask=False or label -1 are ignored; an episode
with no valid point scores 0 error (and ARI 1), never NaN.
"""
from __future__ import annotations

import torch

from emformer.matching import best_assignment, confusion, padded_cost


def _valid(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return mask.bool() & (labels >= 0)


def best_label_permutation(pred: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """perm [B,k] with perm[b, true label] = the predicted label matched to it (most points agreeing)."""
    counts = confusion(pred, labels, _valid(labels, mask), k)  # [B, true, pred]
    return best_assignment(-counts)


def misclustering_rate(pred: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """min over label permutations of the fraction of valid points whose label is wrong. pred [B,n] long."""
    valid = _valid(labels, mask)
    counts = confusion(pred, labels, valid, k)
    perm = best_assignment(-counts)
    agree = torch.gather(counts, 2, perm[..., None]).squeeze(-1).sum(-1)  # points on the matched diagonal
    total = valid.sum(-1).double()
    return (1.0 - agree / total.clamp(min=1)).masked_fill(total == 0, 0.0).float()


def anchored_error(pred: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of valid points with pred != label, no relabelling (labels anchored to the init slots)."""
    valid = _valid(labels, mask)
    wrong = ((pred != labels) & valid).sum(-1).double()
    return (wrong / valid.sum(-1).clamp(min=1)).float()


def adjusted_rand_index(pred: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """ARI from the contingency table, with sklearn's pair-confusion formula (same degenerate cases)."""
    valid = _valid(labels, mask)
    table = confusion(pred, labels, valid, k)  # float64 [B,k,k]
    n = table.sum((1, 2))
    sum_squares = (table ** 2).sum((1, 2))
    rows_sq = (table.sum(2) ** 2).sum(1)  # true-class sizes squared
    cols_sq = (table.sum(1) ** 2).sum(1)  # predicted-cluster sizes squared
    tp = sum_squares - n
    fp = cols_sq - sum_squares  # sklearn's C[0,1] = contingency.dot(n_pred).sum() - sum_squares
    fn = rows_sq - sum_squares
    tn = n ** 2 - fp - fn - sum_squares
    denom = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
    ari = 2.0 * (tp * tn - fn * fp) / torch.where(denom == 0, torch.ones_like(denom), denom)
    perfect = (fn == 0) & (fp == 0)
    return torch.where(perfect, torch.ones_like(ari), ari).float()


def matched_mean_error(est: torch.Tensor, means: torch.Tensor, kmask: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """mean over valid clusters of ‖μ̂ − μ‖ / σ after Hungarian matching of estimated to true means."""
    cost = padded_cost(torch.cdist(est.double(), means.double()), kmask)
    perm = best_assignment(cost)
    matched = torch.gather(cost, 2, perm[..., None]).squeeze(-1)
    matched = torch.where(kmask, matched, torch.zeros_like(matched))
    k = kmask.sum(1).clamp(min=1)
    return (matched.sum(1) / k / sigma.double()).float()

