"""Initial centroids: the one registry from `task.init` names to the functions that draw them (DESIGN §1).

`INITS[name]` takes an `InitInputs` (the batch's points and masks, per-episode uniforms and, for the sampler
only, the episode's truth) and returns centroids [B,k,d] with padded clusters 0. The sampler (episodes.py),
the baselines, the `Clusterer` and task validation all look modes up here, so a new mode is one function and
one entry below. `none` is the one unanchored mode: the model learns its own slots (`TaskSpec.anchored`).
Only this module imports torch among the task's: data/tasks.py imports it when it validates a mode name.

- `noisy_truth`: the true means plus Gaussian noise of expected norm ρ·Δ·σ (needs the truth: sampler only).
- `kmeans++`, `spectral`: computed from the points alone, deterministic given the uniforms.
- `lloyd`: Lloyd's k-means (the spectral init runs it in its embedding; models/baselines.py uses it too).

Shapes: points [B,n,d], mask [B,n] (False = padded point), kmask [B,k] (False = padded cluster). Arithmetic
is float64 inside; results come back in the points' floating dtype. Imports torch only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from emformer import exact

F64 = torch.float64


@dataclass(frozen=True)
class Truth:
    """What the sampler knows about each episode besides its points (for inits that start from the truth)."""

    means: torch.Tensor
    """[B,k,d] true means"""
    normals: torch.Tensor
    """[B,k,d] standard normal draws reserved for the init"""
    separation: torch.Tensor
    """[B] Δ of each episode"""
    sigma: float
    init_noise: float
    """ρ (task.init_noise)"""


@dataclass(frozen=True)
class InitInputs:
    points: torch.Tensor
    mask: torch.Tensor
    kmask: torch.Tensor
    uniforms: torch.Tensor
    """[B, >=k] uniforms in [0,1): the sampler passes 2k (k-means++ reads the first k, spectral the last k, so
    the two modes draw apart); a caller with exactly k gives both modes the same k"""
    truth: Optional[Truth] = None


def prepare_points(points: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 points with padded points zeroed (garbage or NaN there must not leak), and the mask as float."""
    m = mask.bool()
    x = torch.where(m[..., None], points.to(F64), torch.zeros((), dtype=F64, device=points.device))
    return x, m.to(F64)


def sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[B,n,k] squared Euclidean distances, by expansion (batched matmul) in float64."""
    d2 = (x * x).sum(-1)[..., None] - 2 * torch.bmm(x, c.transpose(1, 2)) + (c * c).sum(-1)[:, None, :]
    return d2.clamp(min=0)


def neg_inf_pad(values: torch.Tensor, kmask: torch.Tensor) -> torch.Tensor:
    return values.masked_fill(~kmask.bool()[:, None, :], -math.inf)


def nearest(x: torch.Tensor, centroids: torch.Tensor, kmask: torch.Tensor) -> torch.Tensor:
    return neg_inf_pad(-sq_dist(x, centroids), kmask.bool()).argmax(-1)


def lloyd(points: torch.Tensor, mask: torch.Tensor, kmask: torch.Tensor, init: torch.Tensor,
          iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`iters` Lloyd iterations from `init`; returns (centroids [B,k,d], labels [B,n] with -1 on padding),
    the labels being the nearest final centroid (as sklearn's labels_). An empty cluster keeps its centroid."""
    out_dtype = points.dtype if points.dtype.is_floating_point else torch.float32
    x, m = prepare_points(points, mask)
    km = kmask.bool()
    centroids = init.to(F64) * km.to(F64)[..., None]
    k = centroids.shape[1]
    for _ in range(iters):
        assign = torch.nn.functional.one_hot(nearest(x, centroids, km), k).to(F64) * m[..., None]
        count = assign.sum(1)  # [B,k]
        sums = torch.bmm(assign.transpose(1, 2), x)
        keep = (count == 0)[..., None] | ~km[..., None]
        centroids = torch.where(keep, centroids, sums / count.clamp(min=1)[..., None])
    labels = nearest(x, centroids, km).masked_fill(~mask.bool(), -1)
    return centroids.to(out_dtype), labels


def _d2_sample(weight: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn with probability ∝ weight [B,n] by inverse CDF at u [B] (u in [0,1))."""
    cdf = weight.cumsum(-1)
    target = (u.to(device=weight.device, dtype=F64) * cdf[:, -1])[:, None]
    idx = (cdf <= target).sum(-1)  # first index whose cdf exceeds the target: it has positive weight
    positions = torch.arange(weight.shape[1], device=weight.device)
    last_positive = torch.where(weight > 0, positions, torch.zeros_like(positions)).amax(-1)
    return torch.minimum(idx, last_positive)  # guards rounding at the top end


def _kmeanspp_indices(x: torch.Tensor, m: torch.Tensor, kmask: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[B,k] indices of the chosen points (k-means++ D² sampling, one trial per centre); padded slots
    repeat the first pick. Valid points only; if every valid point coincides with a centre, uniform."""
    batch, k = kmask.shape
    chosen = torch.empty(batch, k, dtype=torch.long, device=x.device)
    chosen[:, 0] = _d2_sample(m, uniforms[:, 0])
    rows = torch.arange(batch, device=x.device)
    closest = exact.sq_norm(x - x[rows, chosen[:, 0]][:, None, :])  # [B,n]
    for j in range(1, k):
        weight = closest * m
        weight = torch.where(weight.sum(-1, keepdim=True) > 0, weight, m)
        pick = _d2_sample(weight, uniforms[:, j])
        pick = torch.where(kmask[:, j].bool(), pick, chosen[:, 0])
        chosen[:, j] = pick
        closest = torch.minimum(closest, exact.sq_norm(x - x[rows, pick][:, None, :]))
    return chosen


def _gather_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(points, 1, idx[..., None].expand(-1, -1, points.shape[-1]))


def kmeans_plus_plus(points: torch.Tensor, mask: torch.Tensor, kmask: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """k-means++ centroids [B,k,d] (padded clusters 0): the first a valid point chosen by uniforms[:,0],
    centre j a valid point drawn ∝ squared distance to the nearest chosen centre by uniforms[:,j]."""
    x, m = prepare_points(points, mask)
    idx = _kmeanspp_indices(x, m, kmask.bool(), uniforms)
    out_dtype = points.dtype if points.dtype.is_floating_point else torch.float32
    return (_gather_points(x, idx) * kmask.to(F64)[..., None]).to(out_dtype)


SPECTRAL_NEIGHBOUR = 7  # local scale = distance to the 7th nearest neighbour (Zelnik-Manor & Perona 2004)
SPECTRAL_LLOYD_ITERS = 10


def spectral_init(points: torch.Tensor, mask: torch.Tensor, kmask: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Spectral-clustering centroids [B,k,d] (padded clusters 0).

    Self-tuning affinity W_ij = exp(−‖x_i − x_j‖² / (s_i s_j)), s_i the distance to the 7th neighbour;
    embedding = top-k eigenvectors of D^{-1/2} W D^{-1/2} (k of that episode), rows normalised; k-means++
    (from `uniforms`) then Lloyd in the embedding; centroids = means of the points of each spectral cluster
    (an empty one falls back to its k-means++ seed point). Cost: one n×n eigendecomposition per episode.

    The affinity, the eigenvectors (LAPACK) and the embedding's Lloyd steps vary with the CPU's math library
    at rounding level; they only decide the labels, and the centroids are computed from the labels with
    `emformer.exact` sums, so an episode's init is the same bits wherever the labels agree.
    """
    x, m = prepare_points(points, mask)
    km = kmask.bool()
    batch, n, _ = x.shape
    k_pad = km.shape[1]
    valid = m.bool()
    pair = valid[:, :, None] & valid[:, None, :]
    d2 = sq_dist(x, x)
    n_valid = valid.sum(-1)
    # Local scale from the r-th nearest other point, r = min(7, n_valid − 1).
    ranked = d2.masked_fill(~pair, math.inf).topk(min(SPECTRAL_NEIGHBOUR + 1, n), -1, largest=False).values
    # (ranked column 0 is the point itself)
    r = (n_valid - 1).clamp(min=1, max=min(SPECTRAL_NEIGHBOUR, n - 1))
    scale2 = torch.gather(ranked, 2, r[:, None, None].expand(-1, n, 1)).squeeze(-1)
    scale2 = torch.where(valid & torch.isfinite(scale2), scale2, torch.ones_like(scale2))
    scale = scale2.clamp(min=1e-12).sqrt()
    affinity = torch.exp(-d2 / (scale[:, :, None] * scale[:, None, :])) * pair
    affinity = affinity * (1 - torch.eye(n, dtype=F64, device=x.device))  # no self-loops
    degree = affinity.sum(-1)
    inv_sqrt = torch.where(degree > 0, degree.clamp(min=1e-300).rsqrt(), torch.zeros_like(degree))
    normalised = affinity * inv_sqrt[:, :, None] * inv_sqrt[:, None, :]
    # Padded points get eigenvalue −2, below every valid one (those lie in [−1, 1]), so never in the top k.
    normalised = normalised - 2 * torch.diag_embed((~valid).to(F64))
    _, vectors = torch.linalg.eigh(normalised)  # ascending eigenvalues
    embedding = vectors.flip(-1)[:, :, :k_pad]  # top k_pad; keep only the top k of each episode
    embedding = embedding * km.to(F64)[:, None, :]
    embedding = embedding / embedding.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    embedding = embedding * m[..., None]

    seeds = _kmeanspp_indices(embedding, m, km, uniforms)
    _, labels = lloyd(embedding, valid, km, _gather_points(embedding, seeds), SPECTRAL_LLOYD_ITERS)
    assign = torch.nn.functional.one_hot(labels.clamp(min=0), k_pad).to(F64) * m[..., None]
    count = assign.sum(1)  # counts: exact in any order
    sums = exact.fsum(x[:, :, None, :] * assign[..., None], 1)  # [B,k,d], summed over points: no BLAS
    centroids = sums / count.clamp(min=1)[..., None]
    centroids = torch.where((count > 0)[..., None], centroids, _gather_points(x, seeds))
    out_dtype = points.dtype if points.dtype.is_floating_point else torch.float32
    return (centroids * km.to(F64)[..., None]).to(out_dtype)


# ---------------------------------------------------------------------------------------------- registry
def _noisy_truth(inputs: InitInputs) -> torch.Tensor:
    truth = inputs.truth
    if truth is None:
        raise ValueError("init noisy_truth starts from the true means: only the episode sampler can draw it")
    scale = truth.separation * (truth.init_noise * truth.sigma / math.sqrt(inputs.points.shape[-1]))
    return (truth.means + truth.normals * scale[:, None, None]).mul_(inputs.kmask[..., None])  # no fused addcmul


def _kmeans_plus_plus(inputs: InitInputs) -> torch.Tensor:
    k = inputs.kmask.shape[1]
    return kmeans_plus_plus(inputs.points, inputs.mask, inputs.kmask, inputs.uniforms[:, :k])


def _spectral(inputs: InitInputs) -> torch.Tensor:
    k = inputs.kmask.shape[1]
    return spectral_init(inputs.points, inputs.mask, inputs.kmask, inputs.uniforms[:, -k:])


def _none(inputs: InitInputs) -> torch.Tensor:
    k = inputs.kmask.shape[1]
    shape = (*inputs.points.shape[:1], k, inputs.points.shape[-1])
    dtype = inputs.truth.means.dtype if inputs.truth is not None else inputs.points.dtype
    return torch.zeros(shape, dtype=dtype, device=inputs.points.device)


INITS: dict[str, Callable[[InitInputs], torch.Tensor]] = {
    "noisy_truth": _noisy_truth,
    "kmeans++": _kmeans_plus_plus,
    "spectral": _spectral,
    "none": _none,  # no initial centroids (tasks.NO_INIT): the model learns slot vectors
}
"""task.init name -> the function drawing its centroids (the order is the one error messages list)"""

NEEDS_TRUTH = ("noisy_truth",)
POINT_INITS = tuple(name for name, draw in INITS.items() if name not in NEEDS_TRUTH and draw is not _none)
"""the modes computed from the points alone: what the Clusterer offers for data without a truth"""


def initial_centroids(name: str, inputs: InitInputs) -> torch.Tensor:
    """The centroids [B,k,d] of mode `name` (KeyError naming the known modes otherwise)."""
    if name not in INITS:
        raise KeyError(f"unknown init {name!r}; known: {', '.join(INITS)}")
    return INITS[name](inputs)
