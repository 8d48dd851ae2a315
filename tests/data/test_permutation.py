"""KeyedPermutation: a bijection of range(N) for every N (powers of two or not, N = 1), fixed by (seed, epoch);
the index stream built on it resumes exactly (coverage across ranks x workers: test_stream.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from emformer.data.permutation import KeyedPermutation, keyed_uniform
from emformer.data.stream import resampled_indices


def epoch_permutation(seed: int, epoch: int, size: int) -> torch.Tensor:
    """perm_e as a whole tensor: a permutation of range(size) fixed by (seed, epoch)."""
    return torch.from_numpy(KeyedPermutation(seed, epoch, size)(np.arange(size)))


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 8, 100, 1000, 1024, 1025, 4099, 65536])
def test_bijection_of_range_n(size):
    for seed, epoch in [(0, 0), (1, 0), (0, 1), (12345, 7)]:
        values = KeyedPermutation(seed, epoch, size)(np.arange(size))
        assert values.dtype == np.int64
        assert np.array_equal(np.sort(values), np.arange(size)), (seed, epoch)


def test_order_depends_on_seed_and_epoch_only():
    a = epoch_permutation(3, 0, 1000)
    assert torch.equal(a, epoch_permutation(3, 0, 1000))
    assert not torch.equal(a, epoch_permutation(3, 1, 1000)) and not torch.equal(a, epoch_permutation(4, 0, 1000))
    # any subset of positions gives the same values as the whole permutation (what a batch computes)
    positions = np.array([999, 0, 500, 17, 17])
    assert np.array_equal(KeyedPermutation(3, 0, 1000)(positions), a.numpy()[positions])
    # a shuffle, not a near-identity: few fixed points, no visible correlation with the position
    assert int((a == torch.arange(1000)).sum()) < 10
    assert abs(np.corrcoef(np.arange(1000), a.numpy())[0, 1]) < 0.1


def test_large_n_without_materialising_it():
    size = 2**40 + 3  # far beyond memory as a permutation; the values needed are still exact and distinct
    got = resampled_indices(5, size, start=2**40 - 2, count=8)
    assert got.shape == (8,) and bool(((got >= 0) & (got < size)).all())
    assert len(set(got[:5].tolist())) == 5  # positions of one epoch map to distinct indices


def test_resume_continues_the_same_positions():
    whole = resampled_indices(9, 37, 0, 200)
    for start in (0, 1, 36, 37, 111):
        assert torch.equal(resampled_indices(9, 37, start, 200 - start), whole[start:])


def test_keyed_uniform_is_a_pure_uniform_function_of_tag_seed_and_step():
    # recorded values: SeedSequence's hash and PCG64 are integer arithmetic, the same on every platform
    assert keyed_uniform(1, 0, 0) == 0.4273616074125838 and keyed_uniform(1, 0, 1) == 0.3494856085387811
    assert keyed_uniform(2, 0, 0) != keyed_uniform(1, 0, 0) != keyed_uniform(1, 1, 0)
    draws = np.array([keyed_uniform(7, 3, step) for step in range(4000)])
    assert draws.min() >= 0 and draws.max() < 1
    assert abs(draws.mean() - 0.5) < 0.02 and np.histogram(draws, bins=4, range=(0, 1))[0].min() > 900
