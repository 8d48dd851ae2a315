"""emformer.exact: the arithmetic the sampler builds episodes from is accurate as well as CPU-independent
(test_cross_cpu.py checks the independence; these check the values against float64 references)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from emformer import exact


def test_log_and_exp_agree_with_float64_references_to_a_few_ulps():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.exp(rng.uniform(-300, 300, 20_000)))
    ref = torch.log(x)
    assert float(((exact.log(x) - ref).abs() / ref.abs().clamp(min=1e-300)).max()) < 1e-15
    assert exact.log_scalar(1.0) == 0.0 and exact.log_scalar(2.0) == pytest.approx(math.log(2), rel=1e-16)
    y = torch.from_numpy(rng.uniform(-700, 700, 20_000))
    assert float(((exact.exp(y) - torch.exp(y)) / torch.exp(y)).abs().max()) < 5e-16
    assert float(exact.exp(torch.zeros(1, dtype=torch.float64))[0]) == 1.0


def test_log_and_exp_refuse_what_they_cannot_compute():
    with pytest.raises(TypeError, match="float64"):
        exact.log(torch.ones(2))
    with pytest.raises(ValueError, match="positive"):
        exact.log(torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="700"):
        exact.exp(torch.tensor([800.0], dtype=torch.float64))


def _unit_floats(rows: int, cols: int, seed: int) -> np.ndarray:
    words = np.random.default_rng(seed).integers(0, 2**32, size=(rows, cols), dtype=np.uint64).astype(np.uint32)
    return ((words & 0x7FFFFF) | 0x3F800000).view(np.float32)


def test_box_muller_normals_match_the_float64_formula():
    f = _unit_floats(32, 2 * 1500, 1)
    pairs = f.shape[1] // 2
    v = 2.0 - f[:, :pairs].astype(np.float64)
    angle = 2 * np.pi * (f[:, pairs:].astype(np.float64) - 1)
    radius = np.sqrt(-2 * np.log(v))
    want = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], 1)
    got = exact.box_muller_normals(f.copy())
    assert got.dtype == np.float32 and np.abs(got - want).max() < 2e-6  # a few float32 ulps of |z| <= 5.7


def test_box_muller_edges():
    """v = 1 (radius exactly 0), the least v 2^-23 (the largest radius, sqrt(46 ln 2)) at the angles
    π/2, π, 3π/2 and 0 (pair j is column j with column j + 5)."""
    least = np.float32(2.0) - np.float32(2**-23)
    f = np.array([[1.0, least, least, least, least, 1.0, 1.25, 1.5, 1.75, 1.0]], dtype=np.float32)
    z = exact.box_muller_normals(f.copy())[0]
    big = math.sqrt(46 * math.log(2))
    assert z[0] == 0 and z[5] == 0  # radius 0
    np.testing.assert_allclose(z[1:5], [0, -big, 0, big], atol=2e-6)  # r cos θ
    np.testing.assert_allclose(z[6:10], [big, 0, -big, 0], atol=2e-6)  # r sin θ


def test_fsum_sums_in_index_order_and_matches_sum():
    x = torch.tensor([[1e8, 1.0, -1e8]], dtype=torch.float32)
    assert float(exact.fsum(x, 1)) == 1.0  # torch's cumsum accumulates float32 in float64
    y = torch.randn(4, 7, 5, dtype=torch.float64)
    torch.testing.assert_close(exact.fsum(y, 1), y.sum(1))
    assert exact.fsum(y, -1, keepdim=True).shape == (4, 7, 1)
    assert exact.fsum(torch.zeros(3, 0), 1).shape == (3,)


def test_matmul_distances_and_gram_schmidt():
    g = torch.randn(6, 5, 5, dtype=torch.float64)
    a = torch.randn(6, 9, 5, dtype=torch.float64)
    torch.testing.assert_close(exact.matmul(a, g), a @ g)
    torch.testing.assert_close(exact.pairwise_dist(a, a[:, :3]), torch.cdist(a, a[:, :3]))
    q = exact.gram_schmidt(g)
    torch.testing.assert_close(q.transpose(1, 2) @ q, torch.eye(5, dtype=torch.float64).expand(6, 5, 5))
    r = q.transpose(1, 2) @ g  # R of g = QR: upper triangular with a positive diagonal
    assert (torch.diagonal(r, dim1=1, dim2=2) > 0).all()
    assert float(torch.tril(r, -1).abs().max()) < 1e-12
    q_ref, r_ref = torch.linalg.qr(g)
    torch.testing.assert_close(q, q_ref * torch.sgn(torch.diagonal(r_ref, dim1=1, dim2=2))[:, None, :])
