"""Float arithmetic whose results IEEE 754 fixes: the same bits on every x86-64 CPU (DESIGN, pitfalls).

Why this module exists: torch routes log, sqrt, exp and matrix products on CPU tensors through a vendor
library (MKL's VML and BLAS, SLEEF) that picks its kernels per CPU, a vectorised reduction sums in an order
set by the vector width and the thread count, and a fused multiply-add (`addcmul`, `add(alpha=)`, `lerp`) is
fused on one CPU and not on another. An episode must be a pure function of (spec, seed, index) on any CPU, so
the sampling path computes with what IEEE 754 rounds exactly once: integer operations, the elementwise
+, −, ×, ÷ of separate torch/numpy kernels, numpy's sqrt (correctly rounded on every code path), sums in a
fixed order (`fsum`), and its own log / exp / cos / sin built from those, with tables computed once with
numpy's elementwise float64 arithmetic. A vendor routine stays only where its output decides a discrete
choice and never reaches a value (the spectral init's eigenvectors pick labels; see data/inits.py).

Accuracy: `log` and `exp` are within a few ulps of float64, `box_muller_normals` within a few float32 ulps;
what matters more here is that the result depends on nothing but the input bits.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

LN2 = 0.6931471805599453  # the double nearest ln 2 (a literal: parsing rounds correctly)
TWO_PI = 2 * math.pi


def fsum(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Sum over `dim` in index order. torch's CPU cumsum is one scalar pass per row (accumulating float32 in
    float64), unlike `sum`, whose order follows the vector width and thread split."""
    total = x.cumsum(dim).narrow(dim, x.shape[dim] - 1, 1) if x.shape[dim] else x.sum(dim, keepdim=True)
    return total if keepdim else total.squeeze(dim)


def sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root: numpy's on CPU tensors (torch's goes through MKL's VML there), torch's
    elsewhere (a GPU's sqrt is IEEE)."""
    if x.device.type != "cpu":
        return torch.sqrt(x)
    return torch.from_numpy(np.sqrt(x.detach().numpy()))


def sq_norm(x: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean norm over the last dim, summed in index order."""
    return fsum(x * x, -1)


def pairwise_sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., n, m] squared distances between the rows of a [..., n, d] and b [..., m, d], by differences
    (not the matmul expansion `cdist` uses)."""
    return sq_norm(a[..., :, None, :] - b[..., None, :, :])


def pairwise_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., n, m] Euclidean distances (see `pairwise_sq_dist`)."""
    return sqrt(pairwise_sq_dist(a, b))


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., n, d] @ b [..., d, m] as d products added left to right (no BLAS), broadcasting a leading
    batch dim. For the small d×d maps of the sampler (d ≤ a few dozen)."""
    out = a[..., :, 0, None] * b[..., None, 0, :]
    for i in range(1, a.shape[-1]):
        out = out + a[..., :, i, None] * b[..., None, i, :]
    return out


def gram_schmidt(g: torch.Tensor) -> torch.Tensor:
    """Q of the QR decomposition of square g [B, d, d] with R's diagonal positive (unique): classical
    Gram-Schmidt, each column orthogonalised twice (enough for Gaussian matrices at float64)."""
    columns: list[torch.Tensor] = []
    for j in range(g.shape[-1]):
        v = g[..., j]
        if columns:
            q = torch.stack(columns, -1)  # [B, d, j]
            for _ in range(2):
                coef = fsum(q * v[..., None], -2)  # [B, j]
                v = v - fsum(q * coef[..., None, :], -1)
        columns.append(v / sqrt(sq_norm(v))[..., None])
    return torch.stack(columns, -1)


# ------------------------------------------------------------------------------------------ log and exp
_LOG_CELLS = 128  # cells of width 1/128 centred on 0.75 + t/128 cover the reduced mantissa [0.75, 1.5)


def _series_log(c: np.ndarray) -> np.ndarray:
    """ln c for c in [0.7, 1.6], float64, by ln c = 2 atanh s, s = (c − 1)/(c + 1), |s| < 0.24: the odd
    series to s^41 (the next term is below 1e-27)."""
    s = (c - 1.0) / (c + 1.0)
    s2 = s * s
    acc = np.zeros_like(s)
    for power in range(41, 0, -2):
        acc = acc * s2 + 1.0 / power
    return 2.0 * s * acc


@functools.lru_cache(maxsize=None)
def _log_tables() -> tuple[np.ndarray, np.ndarray]:
    """ln c_t and 1/c_t at the cell centres c_t = 0.75 + t/128, t = 0..96 (t = 32 is c = 1 exactly)."""
    centres = 0.75 + np.arange(97, dtype=np.float64) / _LOG_CELLS
    return _series_log(centres), 1.0 / centres


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x > 0 float64 (normal) -> (e float64, m in [0.75, 1.5)) with x = 2^e · m exactly."""
    bits = x.view(torch.int64)
    e = (bits >> 52) - 1023
    m = ((bits & ((1 << 52) - 1)) | (1023 << 52)).view(torch.float64)  # [1, 2)
    big = m >= 1.5
    return (e + big).to(torch.float64), torch.where(big, m * 0.5, m)


def log(x: torch.Tensor) -> torch.Tensor:
    """Natural log of positive normal float64 values: x = 2^e·m, m in [0.75, 1.5); ln x = e·ln 2 + ln c_t +
    ln(1 + δ), c_t the nearest table centre, δ = (m − c_t)/c_t (|δ| < 0.0053, series to δ^7)."""
    if x.dtype != torch.float64:
        raise TypeError(f"exact.log takes float64, got {x.dtype}")
    if bool((x <= 0).any()) or not bool(torch.isfinite(x).all()):
        raise ValueError("exact.log takes positive finite values")
    logs, inverses = (torch.from_numpy(table) for table in _log_tables())
    e, m = _split(x)
    y = (m - 0.75) * _LOG_CELLS  # exact: m − 0.75 by Sterbenz, then a power of two
    t = (y + 0.5).floor()
    idx = t.long()
    delta = (y - t) * (inverses[idx] / _LOG_CELLS)  # (m − c_t) / c_t; m − c_t = (y − t)/128 exactly
    acc = torch.zeros_like(delta)
    for power in range(7, 0, -1):  # ln(1 + δ) = δ − δ²/2 + δ³/3 − …
        acc = acc * delta + (1.0 if power % 2 else -1.0) / power
    return e * LN2 + logs[idx] + delta * acc


@functools.lru_cache(maxsize=256)
def log_scalar(value: float) -> float:
    """`log` of one positive Python float (cached: the sampler asks for the same constants every batch)."""
    return float(log(torch.tensor([float(value)], dtype=torch.float64))[0])


_LN2_HI = 0.693145751953125  # ln 2 split (Cody-Waite): 15 significant bits, so k · _LN2_HI is exact here
_LN2_LO = 1.4286068203094173e-06


def exp(x: torch.Tensor) -> torch.Tensor:
    """e^x of float64 values in [−700, 700]: x = k ln 2 + r, |r| ≤ ln 2 / 2, e^r by its Taylor series to
    r^14 (the next term is below 4e-19), times 2^k built from its bits."""
    if x.dtype != torch.float64:
        raise TypeError(f"exact.exp takes float64, got {x.dtype}")
    if not bool((x.abs() <= 700).all()):
        raise ValueError("exact.exp takes values in [-700, 700]")
    k = (x * (1 / LN2) + 0.5).floor()
    r = (x - k * _LN2_HI) - k * _LN2_LO
    acc = torch.ones_like(r)
    for power in range(14, 0, -1):
        acc = acc * (r / power) + 1.0
    scale = ((k.long() + 1023) << 52).view(torch.float64)
    return acc * scale


def _series_cos_sin(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of x in [0, π/4], float64, by Taylor series to x^26 / x^27 (next terms below 1e-25)."""
    x2 = x * x
    cos_acc, sin_acc = np.ones_like(x), np.ones_like(x)
    for j in range(13, 0, -1):
        cos_acc = 1.0 - cos_acc * x2 / ((2 * j - 1) * (2 * j))
        sin_acc = 1.0 - sin_acc * x2 / ((2 * j) * (2 * j + 1))
    return cos_acc, x * sin_acc


def _turn_cos_sin(j: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of 2π · j / 2^bits for integers 0 <= j < 2^bits (bits >= 3), float64: j is reduced to an
    octant exactly in integers, the series runs on [0, π/4]."""
    eighth = 1 << (bits - 3)
    octant, rest = j // eighth, j % eighth
    mirrored = octant % 2 == 1  # the angle within the octant counts back from its end
    steps = np.where(mirrored, eighth - rest, rest).astype(np.float64)
    c, s = _series_cos_sin(steps * (math.pi / 4 / eighth))
    # octant o covers [o π/4, (o+1) π/4): rotate (c, s) of the reduced angle into it
    swap = (octant == 1) | (octant == 2) | (octant == 5) | (octant == 6)
    cos_v, sin_v = np.where(swap, s, c), np.where(swap, c, s)
    cos_sign = np.where((octant >= 2) & (octant <= 5), -1.0, 1.0)
    sin_sign = np.where(octant >= 4, -1.0, 1.0)
    return cos_v * cos_sign, sin_v * sin_sign


# ----------------------------------------------------------------------------------- Box-Muller normals
# Both halves of a Box-Muller pair come from tables indexed by integer bit fields, with a short correction
# in elementwise float32: separate contiguous gathers (strided views of a packed table cost more).
_RADIUS_BITS = 10  # a radius cell: v's exponent and its top 10 mantissa bits (relative width 2^-10)
_ANGLE_HIGH_BITS = 12  # an angle is 2π · j / 2^23; its top 12 bits index the table


@functools.lru_cache(maxsize=None)
def _radius_table() -> np.ndarray:
    """float32 −2 ln c for the lower edge c of every radius cell, indexed by the cell's float32 bits >> 13
    (the entries below v = 2^-23 are never read: a larger table saves an offset subtraction per draw)."""
    cells = np.arange(128 << _RADIUS_BITS, dtype=np.int64)  # every cell of [0, 2) by exponent and mantissa
    first = (127 - 23) << _RADIUS_BITS  # the cell of v = 2^-23, the least v
    edges = (cells[first:] << (23 - _RADIUS_BITS)).astype(np.int32).view(np.float32).astype(np.float64)
    table = np.zeros(len(cells), dtype=np.float32)
    table[first:] = -2.0 * log(torch.from_numpy(edges)).numpy()
    return table


@functools.lru_cache(maxsize=None)
def _angle_table() -> tuple[np.ndarray, np.ndarray]:
    """float32 cos and sin of 2π h / 2^12, h = 0 .. 4095."""
    tables = _turn_cos_sin(np.arange(1 << _ANGLE_HIGH_BITS), _ANGLE_HIGH_BITS)
    return tables[0].astype(np.float32), tables[1].astype(np.float32)


def _take(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """table[idx] for int32 idx, contiguous (torch's index_select takes int32 indices as they are)."""
    return torch.from_numpy(table).index_select(0, torch.from_numpy(idx).view(-1)).numpy().reshape(idx.shape)


def box_muller_normals(ones_to_twos: np.ndarray) -> np.ndarray:
    """[B, 2P] float32 in [1, 2) (23 random mantissa bits each) -> standard normals [B, 2P], in place:
    column j pairs with column j + P. Radius sqrt(−2 ln v), v = 2 − f in (0, 1]; angle 2π (f − 1).

    −2 ln v = −2 ln c − 2 ln(1 + δ) with c the lower edge of v's cell (its exponent and top 10 mantissa
    bits) and δ = (v − c)/c in [0, 2^-10): −2 ln(1 + δ) ≈ δ(δ − 2) (next term below 1e-9); v = 1 is its
    own cell's edge, so the radius is exactly 0 there and never negative. The angle's top 12 bits index
    cos/sin; the remaining ε < 2π/4096 turns them: cos(a + ε) ≈ cos a − ε (sin a + cos a · ε/2), sin(a + ε)
    ≈ sin a + ε (cos a − sin a · ε/2) (next terms below 1e-9)."""
    pairs = ones_to_twos.shape[1] // 2
    first, second = ones_to_twos[:, :pairs], ones_to_twos[:, pairs:]
    table = _radius_table()
    cos_high, sin_high = _angle_table()

    v = np.subtract(np.float32(2.0), first)
    bits = v.view(np.int32)
    idx = bits >> (23 - _RADIUS_BITS)
    edge = np.bitwise_and(bits, ~((1 << (23 - _RADIUS_BITS)) - 1)).view(np.float32)
    delta = np.subtract(v, edge, out=v)  # exact: v and its cell's edge are within a factor of 2
    np.divide(delta, edge, out=delta)
    radius = np.subtract(delta, np.float32(2.0), out=edge)
    np.multiply(radius, delta, out=radius)
    np.add(radius, _take(table, idx), out=radius)
    np.sqrt(radius, out=radius)

    j = np.bitwise_and(second.view(np.int32), 0x7FFFFF, out=idx)
    high = j >> (23 - _ANGLE_HIGH_BITS)
    ch, sh = _take(cos_high, high), _take(sin_high, high)
    eps = np.bitwise_and(j, (1 << (23 - _ANGLE_HIGH_BITS)) - 1, out=j).astype(np.float32)
    eps *= np.float32(TWO_PI / (1 << 23))
    half = np.multiply(eps, np.float32(0.5), out=delta)
    cos_turn = np.multiply(ch, half)
    np.add(cos_turn, sh, out=cos_turn)
    np.multiply(cos_turn, eps, out=cos_turn)
    np.subtract(ch, cos_turn, out=first)  # cos(a + ε)
    np.multiply(sh, half, out=half)
    np.subtract(ch, half, out=ch)
    np.multiply(ch, eps, out=ch)
    np.add(sh, ch, out=second)  # sin(a + ε)
    np.multiply(first, radius, out=first)
    np.multiply(second, radius, out=second)
    return ones_to_twos
