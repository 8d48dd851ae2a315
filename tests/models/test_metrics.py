"""Metrics: known values, invariance to label permutation, masks, ARI against scikit-learn."""
from __future__ import annotations

import pytest
import torch

from emformer.models import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _random_labels(batch: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (batch, n), generator=g)
    # Predictions: mostly the truth under a random relabelling, some noise.
    perm = torch.stack([torch.randperm(k, generator=g) for _ in range(batch)])
    pred = torch.gather(perm, 1, labels)
    flip = torch.rand(batch, n, generator=g) < 0.2
    pred = torch.where(flip, torch.randint(0, k, (batch, n), generator=g), pred)
    lengths = torch.randint(n // 2, n + 1, (batch,), generator=g)
    mask = torch.arange(n)[None, :] < lengths[:, None]
    labels = labels.masked_fill(~mask, -1)
    return pred, labels, mask


def test_misclustering_rate_known_values() -> None:
    labels = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    mask = labels >= 0
    pred = torch.tensor([[2, 2, 0, 0, 1, 0, 1]])  # a relabelling with one point wrong; the padded one ignored
    assert metrics.misclustering_rate(pred, labels, mask, 3).item() == pytest.approx(1 / 6)
    assert metrics.anchored_error(pred, labels, mask).item() == pytest.approx(6 / 6)
    assert metrics.anchored_error(labels.clamp(min=0), labels, mask).item() == 0.0


def test_metrics_invariant_to_label_permutation() -> None:
    k = 4
    pred, labels, mask = _random_labels(16, 60, k, seed=0)
    g = torch.Generator().manual_seed(1)
    relabel = torch.stack([torch.randperm(k, generator=g) for _ in range(16)])
    pred2 = torch.gather(relabel, 1, pred)
    torch.testing.assert_close(metrics.misclustering_rate(pred, labels, mask, k),
                               metrics.misclustering_rate(pred2, labels, mask, k))
    torch.testing.assert_close(metrics.adjusted_rand_index(pred, labels, mask, k),
                               metrics.adjusted_rand_index(pred2, labels, mask, k))
    # The permutation-minimised error is at most the anchored one and at most 1 − 1/k.
    err = metrics.misclustering_rate(pred, labels, mask, k)
    assert torch.all(err <= metrics.anchored_error(pred, labels, mask) + 1e-7)
    assert torch.all(err <= 1 - 1 / k + 1e-7)


def test_masked_points_are_ignored() -> None:
    pred, labels, mask = _random_labels(8, 40, 3, seed=2)
    garbage = torch.where(mask, pred, torch.full_like(pred, 2))
    for fn in (lambda p: metrics.misclustering_rate(p, labels, mask, 3),
               lambda p: metrics.adjusted_rand_index(p, labels, mask, 3),
               lambda p: metrics.anchored_error(p, labels, mask)):
        torch.testing.assert_close(fn(pred), fn(garbage))


def test_ari_matches_sklearn() -> None:
    k = 4
    pred, labels, mask = _random_labels(24, 50, k, seed=3)
    # Degenerate cases too: everything in one cluster, and a perfect labelling.
    pred[0] = 0
    labels[1] = labels[1].clamp(min=0)
    mask[1] = True
    pred[1] = labels[1]
    pred[2] = 1
    labels[2] = torch.where(mask[2], torch.zeros_like(labels[2]), labels[2])
    ours = metrics.adjusted_rand_index(pred, labels, mask, k)
    for b in range(pred.shape[0]):
        keep = mask[b]
        expected = sklearn_metrics.adjusted_rand_score(labels[b][keep].numpy(), pred[b][keep].numpy())
        assert ours[b].item() == pytest.approx(expected, abs=1e-6), b


def test_matched_mean_error() -> None:
    means = torch.tensor([[[0.0, 0.0], [4.0, 0.0], [0.0, 0.0]]])
    kmask = torch.tensor([[True, True, False]])
    est = torch.tensor([[[4.0, 1.0], [0.0, 1.0], [9.0, 9.0]]])  # swapped order, each 1 away; padded slot ignored
    sigma = torch.tensor([2.0])
    assert metrics.matched_mean_error(est, means, kmask, sigma).item() == pytest.approx(0.5)
