"""The init registry: every mode draws valid, deterministic centroids; k-means++ and spectral are good ones."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from emformer.data import inits
from emformer.data.episodes import sample_episodes
from emformer.data.tasks import NO_INIT, TaskSpec
from emformer.errors import ConfigError
from emformer.models import metrics
from emformer.models.clusterer import INIT_MODES


def _episodes(spec: TaskSpec, count: int, seed: int = 3) -> dict[str, torch.Tensor]:
    return sample_episodes(spec.validate(), seed=seed, indices=range(count))


def _inputs(batch: dict[str, torch.Tensor], uniforms: torch.Tensor) -> inits.InitInputs:
    truth = inits.Truth(means=batch["means"].double(), normals=torch.randn(batch["means"].shape, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(2)), separation=batch["separation"].double(),
                        sigma=1.0, init_noise=0.3)
    return inits.InitInputs(batch["points"], batch["mask"], batch["kmask"], uniforms, truth)


@pytest.mark.parametrize("name", list(inits.INITS))
def test_every_mode_is_deterministic_and_zero_on_padded_clusters(name: str) -> None:
    batch = _episodes(TaskSpec(k=2, k_max=4, d=3, n=30, n_max=40, separation=5.0), 8)
    u = torch.rand(8, 2 * 4, generator=torch.Generator().manual_seed(1))
    first = inits.initial_centroids(name, _inputs(batch, u))
    assert first.shape == batch["means"].shape and torch.isfinite(first).all()
    assert torch.equal(first, inits.initial_centroids(name, _inputs(batch, u)))
    assert torch.all(first[~batch["kmask"]] == 0)
    # Every mode is a valid task.init, and the task says whether its labels are anchored.
    assert TaskSpec(k=2, init=name).validate().anchored == (name != NO_INIT)


@pytest.mark.parametrize("name", list(inits.INITS))
def test_episodes_carry_the_registry_init(name: str) -> None:
    """Every mode samples; an anchored one's true component j is the one matched to init slot j."""
    batch = _episodes(TaskSpec(k=3, d=2, n=40, init=name, separation=5.0), 6)
    if name == NO_INIT:
        assert torch.all(batch["init"] == 0)
        return
    cost = torch.cdist(batch["means"].double(), batch["init"].double())  # [B, component, slot]
    matched = cost.diagonal(dim1=1, dim2=2).sum(-1)
    for perm in itertools.permutations(range(3)):
        assert torch.all(matched <= cost[:, list(range(3)), list(perm)].sum(-1) + 1e-9)


def test_unknown_mode_is_a_config_error_listing_the_registry() -> None:
    with pytest.raises(ConfigError, match="task.init: expected one of noisy_truth, kmeans\\+\\+, spectral, none"):
        TaskSpec(init="kmedoids").validate()
    with pytest.raises(KeyError, match="kmedoids"):
        inits.initial_centroids("kmedoids", inits.InitInputs(torch.zeros(1, 3, 2), torch.ones(1, 3, dtype=torch.bool),
                                                              torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2)))


def test_point_inits_need_no_truth_and_are_the_clusterer_modes() -> None:
    assert INIT_MODES == inits.POINT_INITS == ("kmeans++", "spectral") and NO_INIT in inits.INITS
    batch = _episodes(TaskSpec(k=3, d=4, n=50, separation=6.0), 3)
    bare = inits.InitInputs(batch["points"], batch["mask"], batch["kmask"], torch.rand(3, 3))
    for name in inits.POINT_INITS:
        assert inits.initial_centroids(name, bare).shape == (3, 3, 4)
    with pytest.raises(ValueError, match="noisy_truth"):
        inits.initial_centroids("noisy_truth", bare)


def test_kmeans_plus_plus_and_spectral_are_deterministic_valid_points_and_good() -> None:
    spec = TaskSpec(k=3, d=4, n=90, n_max=120, separation=6.0)
    batch = _episodes(spec, 10)
    u = torch.rand(10, 3, generator=torch.Generator().manual_seed(7))
    pp = inits.kmeans_plus_plus(batch["points"], batch["mask"], batch["kmask"], u)
    assert torch.equal(pp, inits.kmeans_plus_plus(batch["points"], batch["mask"], batch["kmask"], u))
    # Every k-means++ centre is one of the episode's valid points.
    dist = ((pp[:, :, None, :] - batch["points"][:, None, :, :]) ** 2).sum(-1)
    dist = dist.masked_fill(~batch["mask"][:, None, :], math.inf)
    assert torch.all(dist.amin(-1) == 0)
    sp = inits.spectral_init(batch["points"], batch["mask"], batch["kmask"], u)
    assert torch.equal(sp, inits.spectral_init(batch["points"], batch["mask"], batch["kmask"], u))
    # At Δ = 6 spectral clustering finds the clusters: its centroids are within sampling error (~sqrt(d/30)σ)
    # of the true means, where a merged or split cluster would be Δ/2 = 3σ off.
    err = metrics.matched_mean_error(sp, batch["means"], batch["kmask"], batch["sigma"])
    assert err.max() < 1.0
