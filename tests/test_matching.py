"""Label matching: every assignment path is exact against scipy.optimize.linear_sum_assignment."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from emformer.matching import MAX_ENUMERATED_K, best_assignment, hungarian


def _costs(kind: str, batch: int, k: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "ties":  # few distinct values: many optimal assignments
        return torch.randint(0, 3, (batch, k, k), generator=generator).double()
    cost = torch.rand(batch, k, k, generator=generator, dtype=torch.float64) * 100 - 50
    if kind == "forbidden":  # +inf pairs, with a feasible assignment always left (the diagonal)
        cost = cost.masked_fill(torch.rand(batch, k, k, generator=generator) < 0.4, float("inf"))
        cost[:, torch.arange(k), torch.arange(k)] = torch.rand(batch, k, generator=generator, dtype=torch.float64)
    return cost


def _scipy_total(cost: torch.Tensor) -> torch.Tensor:
    totals = []
    for matrix in cost.numpy():
        rows, cols = linear_sum_assignment(np.nan_to_num(matrix, posinf=1e12))
        totals.append(matrix[rows, cols].sum())
    return torch.tensor(totals, dtype=torch.float64)


def _total(cost: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return torch.gather(cost, 2, perm[..., None]).sum((1, 2))


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 12])
@pytest.mark.parametrize("kind", ["random", "ties", "forbidden"])
def test_batched_hungarian_is_optimal(k, kind):
    cost = _costs(kind, 64, k, torch.Generator().manual_seed(k))
    perm = hungarian(cost)
    assert torch.equal(torch.sort(perm, dim=1).values, torch.arange(k).expand(64, k))  # permutations
    torch.testing.assert_close(_total(cost, perm), _scipy_total(cost), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("k", [3, MAX_ENUMERATED_K + 2])
def test_best_assignment_agrees_with_scipy_on_every_path(k):
    cost = _costs("ties", 32, k, torch.Generator().manual_seed(7))
    torch.testing.assert_close(_total(cost, best_assignment(cost)), _scipy_total(cost))
    torch.testing.assert_close(_total(cost, hungarian(cost.float())), _scipy_total(cost))


def test_hungarian_keeps_to_the_cost_device_and_makes_no_host_copy():
    """The batched path only uses torch ops on the cost's device: on meta tensors any host copy or sync raises."""
    cost = _costs("random", 8, 9, torch.Generator().manual_seed(1)).to("meta")  # meta: any host copy raises
    perm = hungarian(cost)
    assert perm.device.type == "meta" and perm.shape == (8, 9)


def _kernels(k: int) -> int:
    """Kernels `hungarian` runs on a [64, k, k] meta cost: dispatched ops, less views and the wrapping of
    Python scalars (no kernel either)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    not_kernels = {"aten.unsqueeze.default", "aten.view.default", "aten.expand.default", "aten.select.int",
                   "aten.slice.Tensor", "aten.squeeze.dim", "aten.squeeze.default", "aten.scalar_tensor.default"}

    class Count(TorchDispatchMode):
        kernels = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.kernels += str(func) not in not_kernels
            return func(*args, **(kwargs or {}))

    with Count():
        hungarian(torch.zeros(64, k, k, dtype=torch.float64, device="meta"))
    return Count.kernels


def test_hungarian_makes_no_tensor_on_the_host_and_launches_few_kernels(monkeypatch):
    """torch.tensor(value, device=cuda) is a host-to-device copy the host waits for: none per call."""
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **kw: made.append(kw.get("device")) or real(*a, **kw))
    kernels = _kernels(8)
    assert made == []
    # k² + k = 72 steps at k = 8, about 13 kernels a step on average (advanced indexing made it ~1,400).
    assert kernels <= 13 * 72
