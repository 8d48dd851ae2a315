"""Sampling GMM clustering episodes (DESIGN §1).

Episode `i` of seed `s` is a pure function of (spec, s, i): its raw random numbers come from a Philox
counter-based generator keyed by (s, i), drawn in a fixed order, so any episode can be regenerated alone,
shards can be written in parallel and a resumed stream sees exactly what it would have seen. Only the raw
draws are per episode; every transform (rescaling to Δ, labels, noise, init, anchoring) is batched torch.

Batch layout (all padded to the spec's k_pad / n_pad / d_pad):
  points [B,n,d] f32 · labels [B,n] i64 (-1 = padding) · mask [B,n] bool · means [B,k,d] · weights [B,k]
  scales [B,d] (per-axis noise scale) · sigma [B] · init [B,k,d] · kmask [B,k] bool · k [B] · n [B]
  separation [B] · seed [B] · index [B]
With an init, component j of `means`/`weights`/`labels` is the one matched to init centroid j (Hungarian on
distances), so `labels` are the anchored cross-entropy targets.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from emformer.data.tasks import TaskSpec
from emformer.models.matching import best_assignment

Batch = dict[str, torch.Tensor]

EPISODE_KEYS = (
    "points", "labels", "mask", "means", "weights", "scales", "sigma", "init", "kmask",
    "k", "n", "separation", "seed", "index",
)


def episode_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of episode `index` under `seed`: Philox keyed by the pair, no shared state."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.Generator(np.random.Philox(key=[seed & 0xFFFFFFFFFFFFFFFF, index & 0xFFFFFFFFFFFFFFFF]))


def _raw_draws(spec: TaskSpec, seed: int, index: int) -> dict[str, np.ndarray]:
    """Every random number episode (seed, index) needs, in a fixed order. Shapes depend on the spec only."""
    rng = episode_rng(seed, index)
    k, n, d = spec.k_pad, spec.n_pad, spec.d
    draws = {
        "choices": rng.random(3),  # k, n, Δ within their ranges
        "means": rng.standard_normal((k, d)),
    }
    if spec.weights == "dirichlet":
        draws["weights"] = rng.standard_gamma(spec.weights_alpha, size=k)
    elif spec.weights == "range":
        draws["weights"] = rng.uniform(spec.weights_lo, spec.weights_hi, size=k)
    else:
        draws["weights"] = np.ones(k)
    draws["axis"] = rng.uniform(-1.0, 1.0, size=d) if spec.noise == "diagonal" else np.zeros(d)
    # The [n, d] draws dominate the cost: float32 halves it (means stay float64 so Δ is exact).
    draws["label_u"] = rng.random(n, dtype=np.float32)
    if spec.noise == "student_t":
        t_unit = math.sqrt((spec.noise_df - 2) / spec.noise_df)
        draws["noise"] = (rng.standard_t(spec.noise_df, size=(n, d)) * t_unit).astype(np.float32)
    else:
        draws["noise"] = rng.standard_normal((n, d), dtype=np.float32)
    draws["init_noise"] = rng.standard_normal((k, d))
    draws["init_u"] = rng.random(2 * k)  # k-means++ picks (spectral uses the second half)
    return draws


def sample_episodes(spec: TaskSpec, seed: int, indices: Sequence[int] | torch.Tensor) -> Batch:
    """Episodes `indices` of `seed` under `spec`, as one padded batch (see module doc)."""
    idx = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
    if not idx:
        raise ValueError("sample_episodes needs at least one index")
    raws = [_raw_draws(spec, seed, i) for i in idx]
    raw = {key: torch.from_numpy(np.stack([r[key] for r in raws])) for key in raws[0]}
    batch = _transform(spec, raw)
    batch["seed"] = torch.full((len(idx),), seed, dtype=torch.long)
    batch["index"] = torch.tensor(idx, dtype=torch.long)
    return batch


def _pick_int(lo: int, hi: int | None, u: torch.Tensor) -> torch.Tensor:
    if hi is None or hi == lo:
        return torch.full(u.shape, lo, dtype=torch.long)
    return (lo + torch.floor(u * (hi - lo + 1))).long().clamp(max=hi)


def _transform(spec: TaskSpec, raw: dict[str, torch.Tensor]) -> Batch:
    f64 = torch.float64
    batch_size = raw["means"].shape[0]
    k_pad, n_pad, d = spec.k_pad, spec.n_pad, spec.d
    u = raw["choices"]
    k = _pick_int(spec.k, spec.k_max, u[:, 0])
    n = _pick_int(spec.n, spec.n_max, u[:, 1])
    if spec.separation_max is None:
        delta = torch.full((batch_size,), float(spec.separation), dtype=f64)
    else:
        delta = spec.separation + u[:, 2] * (spec.separation_max - spec.separation)
    kmask = torch.arange(k_pad)[None, :] < k[:, None]
    mask = torch.arange(n_pad)[None, :] < n[:, None]

    # Means: random directions, centred, rescaled so the closest pair is exactly Δσ apart.
    means = raw["means"] * kmask[..., None]
    centre = means.sum(1, keepdim=True) / k[:, None, None]
    means = (means - centre) * kmask[..., None]
    dist = torch.cdist(means, means)
    pair_ok = kmask[:, :, None] & kmask[:, None, :] & ~torch.eye(k_pad, dtype=torch.bool)[None]
    min_dist = dist.masked_fill(~pair_ok, math.inf).amin(dim=(1, 2))
    means = means * (delta * spec.sigma / min_dist)[:, None, None]

    weights = raw["weights"] * kmask
    weights = weights / weights.sum(1, keepdim=True)

    # Labels by inverse CDF; clamp guards the last bin against rounding.
    cdf = weights.float().cumsum(1)
    labels = (raw["label_u"][..., None] > cdf[:, None, :]).sum(-1)
    labels = torch.minimum(labels, k[:, None] - 1)

    scales = (spec.sigma * torch.exp(raw["axis"] * math.log(spec.diag_ratio))).float()  # [B, d]
    centres = torch.gather(means.float(), 1, labels[..., None].expand(-1, -1, d))
    points = centres + raw["noise"] * scales[:, None, :]
    points = points * mask[..., None]
    labels = labels.masked_fill(~mask, -1)

    init = _initial_centroids(spec, points, mask, kmask, means, delta, raw)
    if spec.init != "none":
        means, weights, labels = _anchor(means, weights, labels, init, kmask)

    out: Batch = {
        "points": points, "labels": labels, "mask": mask, "means": means, "weights": weights,
        "scales": scales, "init": init, "kmask": kmask, "k": k, "n": n, "separation": delta.float(),
    }
    out["sigma"] = torch.full((batch_size,), float(spec.sigma))
    if spec.d_pad > d:
        pad = spec.d_pad - d
        for key in ("points", "means", "init"):
            out[key] = torch.nn.functional.pad(out[key], (0, pad))
        out["scales"] = torch.nn.functional.pad(out["scales"], (0, pad))
    for key in ("points", "means", "weights", "scales", "init"):
        out[key] = out[key].float()
    return out


def _initial_centroids(spec: TaskSpec, points: torch.Tensor, mask: torch.Tensor, kmask: torch.Tensor,
                       means: torch.Tensor, delta: torch.Tensor, raw: dict[str, torch.Tensor]) -> torch.Tensor:
    k_pad = kmask.shape[1]
    if spec.init == "noisy_truth":
        scale = spec.init_noise * delta * spec.sigma / math.sqrt(points.shape[-1])
        return (means + raw["init_noise"] * scale[:, None, None]) * kmask[..., None]
    if spec.init == "none":
        return torch.zeros_like(means)
    from emformer.models import baselines  # heavier module; only these init modes need it

    if spec.init == "kmeans++":
        return baselines.kmeans_plus_plus(points, mask, kmask, raw["init_u"][:, :k_pad])
    return baselines.spectral_init(points, mask, kmask, raw["init_u"][:, k_pad:])


def _anchor(means: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor, init: torch.Tensor,
            kmask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Relabel components so that component j is the one Hungarian-matched to init centroid j."""
    cost = torch.cdist(means, init.to(means.dtype))
    valid = kmask[:, :, None] & kmask[:, None, :]
    both_pad = ~kmask[:, :, None] & ~kmask[:, None, :]
    cost = torch.where(valid, cost, torch.where(both_pad, torch.zeros_like(cost), torch.full_like(cost, math.inf)))
    perm = best_assignment(cost)  # perm[b, true component] = init slot
    inverse = torch.argsort(perm, dim=1)  # inverse[b, slot] = true component
    means = torch.gather(means, 1, inverse[..., None].expand_as(means))
    weights = torch.gather(weights, 1, inverse)
    labels = torch.where(labels >= 0, torch.gather(perm, 1, labels.clamp(min=0)), labels)
    return means, weights, labels
