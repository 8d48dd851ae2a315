"""Training losses: anchored CE with padding, the permutation-minimised CE (init: none), the centroid term."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from emformer.models.losses import (anchored_cross_entropy, centroid_mse, clustering_loss,
                                    per_episode_cross_entropy, per_episode_permutation_cross_entropy,
                                    permutation_cross_entropy)


def random_problem(batch: int = 5, n: int = 20, k: int = 4, seed: int = 0, k_real: int | None = None):
    g = torch.Generator().manual_seed(seed)
    k_real = k if k_real is None else k_real
    logits = torch.randn(batch, n, k, generator=g) * 2
    kmask = torch.zeros(batch, k, dtype=torch.bool)
    kmask[:, :k_real] = True
    logits = logits.masked_fill(~kmask[:, None, :], float("-inf"))
    labels = torch.randint(0, k_real, (batch, n), generator=g)
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[:, n - 5:] = False  # the last points are padding
    labels[~mask] = -1
    return logits, labels, mask, kmask


def test_cross_entropy_ignores_padding_and_matches_torch():
    logits, labels, mask, kmask = random_problem(k_real=3)
    per_episode = per_episode_cross_entropy(logits, labels, mask)
    for b in range(logits.shape[0]):
        valid = mask[b]
        expected = F.cross_entropy(logits[b][valid], labels[b][valid])
        torch.testing.assert_close(per_episode[b], expected)
    torch.testing.assert_close(anchored_cross_entropy(logits, labels, mask), per_episode.mean())
    # Values at padded positions do not matter.
    garbage = logits.clone()
    garbage[~mask] = 1e4
    torch.testing.assert_close(per_episode_cross_entropy(garbage, labels, mask), per_episode)


@pytest.mark.parametrize("k_real", [4, 3])
def test_permutation_cross_entropy_is_the_brute_force_minimum(k_real):
    logits, labels, mask, kmask = random_problem(k_real=k_real, seed=1)
    got = per_episode_permutation_cross_entropy(logits, labels, mask, kmask)
    for b in range(logits.shape[0]):
        best = min(
            float(per_episode_cross_entropy(logits[b:b + 1], torch.where(mask[b], torch.tensor(perm)[labels[b].clamp(min=0)],
                                                                         labels[b])[None], mask[b:b + 1]))
            for perm in itertools.permutations(range(k_real))
        )
        assert float(got[b]) == pytest.approx(best, rel=1e-5)
    assert torch.isfinite(got).all()  # padded slots (-inf) are never assigned a real cluster


def test_permutation_cross_entropy_is_invariant_to_relabelling_and_has_gradients():
    logits, labels, mask, kmask = random_problem(seed=2)
    relabel = torch.tensor([2, 0, 3, 1])
    relabelled = torch.where(mask, relabel[labels.clamp(min=0)], labels)
    a = permutation_cross_entropy(logits, labels, mask, kmask)
    b = permutation_cross_entropy(logits, relabelled, mask, kmask)
    torch.testing.assert_close(a, b)
    assert float(a) <= float(anchored_cross_entropy(logits, labels, mask)) + 1e-6
    leaf = logits.clone().requires_grad_(True)
    permutation_cross_entropy(leaf, labels, mask, kmask).backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_centroid_term_only_with_an_anchor():
    logits, labels, mask, kmask = random_problem(k_real=3, seed=3)
    means = torch.randn(logits.shape[0], 4, 2)
    sigma = torch.full((logits.shape[0],), 2.0)
    batch = {"labels": labels, "mask": mask, "kmask": kmask, "means": means, "sigma": sigma}
    centroids = means + 2.0  # every valid coordinate off by 2 = 1 sigma: squared distance 2 per cluster
    assert float(centroid_mse(centroids, means, kmask, sigma)) == pytest.approx(2.0)
    plain = clustering_loss(logits, batch, anchored=True)
    with_term = clustering_loss(logits, batch, anchored=True, centroids=centroids, centroid_weight=0.5)
    assert float(with_term - plain) == pytest.approx(1.0)
    unanchored = clustering_loss(logits, batch, anchored=False, centroids=centroids)
    torch.testing.assert_close(unanchored, permutation_cross_entropy(logits, labels, mask, kmask))


def test_float64_cross_entropy_matches_torch_and_handles_padded_clusters() -> None:
    """The baselines' figures: computed in float64 from log-posteriors, returned as float32."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 10, 4, generator=g)
    logits[:, :, 3] = -math.inf  # a padded cluster
    labels = torch.randint(0, 3, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 7:] = False
    labels[0, 7:] = -1
    ours = per_episode_cross_entropy(logits, labels, mask, dtype=torch.float64)
    for b in range(3):
        keep = mask[b]
        expected = torch.nn.functional.cross_entropy(logits[b][keep], labels[b][keep])
        assert ours[b].item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.isfinite(ours).all() and ours.dtype == torch.float32


def test_the_label_matching_cost_stays_float32_under_autocast():
    """The permutation-minimised CE sums -log p over n points in a matmul: under bf16 autocast it must give
    the float32 figure (bf16 would be off by ~0.4% and could pick another relabelling)."""
    logits, labels, mask, kmask = random_problem(batch=16, n=200, k=4)
    exact = per_episode_permutation_cross_entropy(logits, labels, mask, kmask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = per_episode_permutation_cross_entropy(logits, labels, mask, kmask)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=1e-6, atol=1e-6)


def test_iterated_loss_weighs_the_passes_toward_the_last():
    from emformer.models.losses import iterated_loss, pass_weights

    assert pass_weights(1) == [1.0] and pass_weights(3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (4, 10))
    batch = {"labels": labels, "mask": torch.ones(4, 10, dtype=torch.bool), "kmask": torch.ones(4, 3, dtype=torch.bool)}
    passes = [(torch.randn(4, 10, 3), None) for _ in range(3)]
    each = [clustering_loss(logits, batch, anchored=True) for logits, _ in passes]
    assert torch.equal(iterated_loss(passes[:1], batch, anchored=True), each[0])
    torch.testing.assert_close(iterated_loss(passes, batch, anchored=True), (each[0] + 2 * each[1] + 3 * each[2]) / 6)
