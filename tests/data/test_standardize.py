"""The one standardisation rule (data/standardize.py) shared by task.standardize and the Clusterer."""
from __future__ import annotations

import pytest
import torch

from emformer.data.standardize import STANDARD_SCALE, standardization


def _episodes() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 4, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + 7.0
    mask = torch.arange(50)[None] < torch.tensor([50, 30, 12])[:, None]
    return x * mask[..., None], mask


def test_isotropic_pools_the_variance_over_the_own_coordinates() -> None:
    x, mask = _episodes()
    rule = standardization(x, mask, target=2.0)
    z = (x - rule.mean) / rule.scale
    for b, n in enumerate((50, 30, 12)):
        real = z[b, :n]
        torch.testing.assert_close(real.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
        assert float(real.var(0, unbiased=False).mean()) == pytest.approx(4.0, rel=1e-9)
        assert torch.all(rule.scale[b] == rule.scale[b, 0, 0])  # one common scale: the shape is kept
    assert not rule.flat.any()
    # zero padding beyond an episode's own d (or a constant column) does not count: the same scale
    padded = torch.cat([x, torch.zeros(3, 50, 2, dtype=torch.float64), torch.full((3, 50, 1), 5.0,
                                                                             dtype=torch.float64)], -1)
    own = standardization(padded, mask, target=2.0)
    torch.testing.assert_close(own.scale[..., :4], rule.scale)
    torch.testing.assert_close(own.mean[..., :4], rule.mean)
    everything = standardization(padded, mask, target=2.0, own_only=False)  # exports before task.standardize
    torch.testing.assert_close(everything.scale, own.scale * (4 / 7) ** 0.5)


def test_per_feature_and_flat_episodes() -> None:
    x, mask = _episodes()
    rule = standardization(x, mask, per_feature=True)
    z = ((x - rule.mean) / rule.scale)[0]
    torch.testing.assert_close(z.var(0, unbiased=False), torch.full((4,), STANDARD_SCALE ** 2, dtype=torch.float64))
    flat = standardization(torch.full((1, 5, 2), 3.0), torch.ones(1, 5, dtype=torch.bool))
    assert flat.flat.tolist() == [True] and (flat.scale == 1).all()  # nothing divided by 0

