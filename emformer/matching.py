"""Label matching: cluster labels are defined only up to permutation (DESIGN §1, label anchoring).

For k <= MAX_ENUMERATED_K every permutation is scored at once in torch (batched, exact); above that a
batched Hungarian algorithm (shortest augmenting paths with potentials, O(k³)) runs in torch on the cost's
own device, with a fixed number of steps and masks instead of per-episode branches: no host copy, no sync.
On CPU tensors, where there is no device to leave, scipy's per-episode C loop is faster and runs instead.
"""
from __future__ import annotations

import functools
import itertools
import math

import torch

from emformer import exact

MAX_ENUMERATED_K = 6


@functools.lru_cache(maxsize=None)
def _permutations(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every permutation of range(k) [P, k], and where each one's entries sit in a flattened k x k cost
    [P * k]: cached per device, so a step on a GPU copies no table from the host."""
    perms = torch.tensor(list(itertools.permutations(range(k))), dtype=torch.long)
    return perms.to(device), (torch.arange(k) * k + perms).flatten().to(device)


def padded_cost(cost: torch.Tensor, kmask: torch.Tensor) -> torch.Tensor:
    """cost [B, k, k] between two sets of k slots of which kmask [B, k] are real: a real slot may match only a
    real one (+inf otherwise), and padded slots match each other at no cost, so they never move the total."""
    valid = kmask[:, :, None] & kmask[:, None, :]
    both_pad = ~kmask[:, :, None] & ~kmask[:, None, :]
    return torch.where(valid, cost, torch.where(both_pad, torch.zeros_like(cost), torch.full_like(cost, math.inf)))


def best_assignment(cost: torch.Tensor) -> torch.Tensor:
    """Minimum-cost assignment for a batch of square cost matrices.

    cost: [B, k, k], cost[b, i, j] = cost of matching row i to column j.
    Returns perm [B, k] with perm[b, i] = the column matched to row i (a permutation).
    Use +inf (or a large value) to forbid pairs, e.g. padded clusters.
    """
    if cost.ndim != 3 or cost.shape[1] != cost.shape[2]:
        raise ValueError(f"cost must be [B, k, k], got {tuple(cost.shape)}")
    batch, k, _ = cost.shape
    if k <= MAX_ENUMERATED_K:
        finite = torch.nan_to_num(cost.double(), posinf=1e30, neginf=-1e30)
        perms, flat = _permutations(k, cost.device)
        # total[b, p] = sum_i cost[b, i, perms[p, i]]: one index_select of the flattened costs
        total = exact.fsum(finite.reshape(batch, k * k).index_select(1, flat).view(batch, -1, k), -1)  # [B, P]
        return perms.index_select(0, total.argmin(dim=1))
    if cost.device.type == "cpu":  # no device to leave: scipy's C loop beats k² small torch steps here
        return _scipy_assignment(cost)
    return hungarian(cost)


def _scipy_assignment(cost: torch.Tensor) -> torch.Tensor:
    # scipy costs 0.5-1.8 s to import and is only needed above MAX_ENUMERATED_K: keep it out of light commands.
    from scipy.optimize import linear_sum_assignment

    out = torch.empty(cost.shape[:2], dtype=torch.long)
    for b, matrix in enumerate(_forbidden_as_big(cost).numpy()):
        rows, cols = linear_sum_assignment(matrix)
        out[b, torch.from_numpy(rows)] = torch.from_numpy(cols)
    return out


def _forbidden_as_big(cost: torch.Tensor) -> torch.Tensor:
    """+inf -> a cost larger than any assignment of finite pairs can total, per matrix (and -inf -> its
    negative), so exact arithmetic on potentials stays possible where 1e30 would swamp the finite costs."""
    cost = cost.double()
    finite = torch.isfinite(cost)
    span = torch.where(finite, cost.abs(), torch.zeros_like(cost)).flatten(1).amax(1)  # [B]
    big = (2 * span * cost.shape[1] + 1)[:, None, None]
    return torch.where(finite, cost, torch.where(cost > 0, big, -big))


def hungarian(cost: torch.Tensor) -> torch.Tensor:
    """Exact minimum-cost assignment of a batch of square cost matrices [B, k, k] -> perm [B, k], batched.

    The e-maxx formulation of the Hungarian algorithm (row i is added by a shortest augmenting path over
    reduced costs cost - u - v; column 0 is a dummy that holds the row being added). Row i needs at most i
    path-growing steps and i path-flipping steps, so every episode runs the same (k² + k) steps and those
    that finish early are masked: no data-dependent branch, hence no host sync on a GPU, and no tensor made on
    the host (constants are Python numbers). Each step is a few gathers and elementwise ops, with no advanced
    indexing: on a GPU the kernel launches, not the arithmetic, are the cost of these k x k problems.
    """
    batch, k, _ = cost.shape
    device = cost.device
    a = torch.nn.functional.pad(_forbidden_as_big(cost), (1, 0, 1, 0))  # [B, k+1, k+1], row/col 0 dummy
    big = torch.finfo(a.dtype).max  # a Python number: no tensor made on the host
    u = torch.zeros(batch, k + 1, dtype=a.dtype, device=device)  # row potentials
    v = torch.zeros_like(u)  # column potentials
    p = torch.zeros(batch, k + 1, dtype=torch.long, device=device)  # p[j] = row matched to column j (0: none)
    way = torch.zeros_like(p)  # way[j] = the column before j on the path; way[0] stays 0 (column 0 is used first)
    columns = torch.arange(k + 1, device=device)
    for i in range(1, k + 1):
        p[:, 0] = i
        j0 = torch.zeros(batch, 1, dtype=torch.long, device=device)  # [B, 1]: the path's last column
        minv = torch.full_like(u, big)
        used = torch.zeros(batch, k + 1, dtype=torch.bool, device=device)
        for _ in range(i):  # grow the path until it reaches a free column
            # Column j0 joins the path: used, and out of the minimum below (minv -inf: no cost beats it). A
            # finished episode marks its free column too, which freezes its way[] entry with the path's.
            at_j0 = columns == j0
            used = used | at_j0
            minv = minv.masked_fill(at_j0, -math.inf)
            i0 = p.gather(1, j0)  # [B, 1]: the row matched to j0; 0 once the path ended at a free column
            active = i0 != 0
            cur = a.gather(1, i0[..., None].expand(-1, -1, k + 1)).squeeze(1) - u.gather(1, i0) - v
            better = cur < minv  # never on a used column
            minv = torch.where(better, cur, minv)
            way = torch.where(better, j0, way)
            delta, j1 = torch.where(used, big, minv).min(dim=1, keepdim=True)
            delta = torch.where(active, delta, 0.0)  # a finished episode changes no potential
            step = delta * used
            u.scatter_add_(1, p, step)  # rows of used columns (column 0 holds row i)
            v = v - step
            minv = minv - (delta - step)  # minus delta on the free columns
            j0 = torch.where(active, j1, j0)
        for _ in range(i):  # flip the path back to the dummy column: way[0] = 0 ends it (p[0] is scratch)
            j1 = way.gather(1, j0)
            p.scatter_(1, j0, p.gather(1, j1))
            j0 = j1
    perm = torch.empty(batch, k, dtype=torch.long, device=device)
    perm.scatter_(1, p[:, 1:] - 1, torch.arange(k, device=device).expand(batch, k))
    return perm


def confusion(pred: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Counts C[b, i, j] = #{points with true label i and predicted label j}, masked points excluded."""
    batch = pred.shape[0]
    valid = mask & (labels >= 0) & (pred >= 0)
    flat = (labels.clamp(min=0) * k + pred.clamp(min=0)) * valid
    counts = torch.zeros(batch, k * k, dtype=torch.float64, device=pred.device)
    counts.scatter_add_(1, flat.long(), valid.double())
    return counts.view(batch, k, k)
