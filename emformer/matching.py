"""Label matching: cluster labels are defined only up to permutation (DESIGN §1, label anchoring).

For k <= MAX_ENUMERATED_K every permutation is scored at once in torch (batched, exact); above that the
Hungarian algorithm (scipy.optimize.linear_sum_assignment) runs per episode.
"""
from __future__ import annotations

import functools
import itertools

import numpy as np
import torch

MAX_ENUMERATED_K = 6


def _hungarian():
    # scipy costs 0.5-1.8 s to import and is only needed above MAX_ENUMERATED_K: keep it out of light commands.
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment


@functools.lru_cache(maxsize=None)
def _permutations(k: int) -> torch.Tensor:
    return torch.tensor(list(itertools.permutations(range(k))), dtype=torch.long)


def best_assignment(cost: torch.Tensor) -> torch.Tensor:
    """Minimum-cost assignment for a batch of square cost matrices.

    cost: [B, k, k], cost[b, i, j] = cost of matching row i to column j.
    Returns perm [B, k] with perm[b, i] = the column matched to row i (a permutation).
    Use +inf (or a large value) to forbid pairs, e.g. padded clusters.
    """
    if cost.ndim != 3 or cost.shape[1] != cost.shape[2]:
        raise ValueError(f"cost must be [B, k, k], got {tuple(cost.shape)}")
    batch, k, _ = cost.shape
    finite = torch.nan_to_num(cost.double(), posinf=1e30, neginf=-1e30)
    if k <= MAX_ENUMERATED_K:
        perms = _permutations(k).to(cost.device)  # [P, k]
        rows = torch.arange(k, device=cost.device)
        # total[b, p] = sum_i cost[b, i, perms[p, i]]
        total = finite[:, rows, perms].sum(-1)  # [B, P]
        return perms[total.argmin(dim=1)]
    out = np.empty((batch, k), dtype=np.int64)
    for b, matrix in enumerate(finite.cpu().numpy()):
        rows_idx, cols = _hungarian()(matrix)
        out[b, rows_idx] = cols
    return torch.from_numpy(out).to(cost.device)


def confusion(pred: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Counts C[b, i, j] = #{points with true label i and predicted label j}, masked points excluded."""
    batch = pred.shape[0]
    valid = mask & (labels >= 0) & (pred >= 0)
    flat = (labels.clamp(min=0) * k + pred.clamp(min=0)) * valid
    counts = torch.zeros(batch, k * k, dtype=torch.float64, device=pred.device)
    counts.scatter_add_(1, flat.long(), valid.double())
    return counts.view(batch, k, k)
