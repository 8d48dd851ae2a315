"""Classical baselines, batched over episodes in torch with padding masks (DESIGN §2).

- `em`: EM for Gaussian mixtures with spherical (one variance per component, sklearn's 'spherical') or
  diagonal ('diag') covariances, weights estimated, `reg` added to variances like sklearn's reg_covar.
  One iteration = E-step then M-step, as sklearn counts them; the returned log_resp is a final E-step with
  the final parameters (what sklearn's fit_predict returns).
- `lloyd`: Lloyd's k-means. An empty cluster keeps its centroid (sklearn instead moves it to a far point).
- `kmeans_plus_plus`, `spectral_init`: initial centroids, deterministic given per-episode uniforms.
- `oracle_log_posterior`: the Bayes classifier with the true means, weights and noise (the error floor).
- `evaluate_baselines`: per-episode errors and losses of all of them, on one batch (see its doc).

Shapes: points [B,n,d], mask [B,n] (False = padded point), kmask [B,k] (False = padded cluster), init
[B,k,d]. Episodes in one batch may differ in n and k; no Python loop runs over episodes. Arithmetic is
float64 inside; results come back in the points' floating dtype (log-posteriors in float32).

Dimension padding (task.d_max): coordinates that are zero for every valid point of an episode are padding;
the spherical variance is the mean over the other coordinates only, so padding does not shrink it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from emformer.models import metrics

F64 = torch.float64
# sklearn adds 10 * eps to every component's responsibility mass so an empty component divides safely.
_MASS_EPS = 10 * torch.finfo(F64).eps


@dataclass
class EMResult:
    means: torch.Tensor
    """[B,k,d]"""
    weights: torch.Tensor
    """[B,k] (0 on padded clusters)"""
    variances: torch.Tensor
    """[B,k] (spherical) or [B,k,d] (diag)"""
    log_resp: torch.Tensor
    """[B,n,k] log responsibilities under the final parameters; padded clusters -inf"""


def _prepare(points: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 points with padded points zeroed (garbage or NaN there must not leak), and the mask as float."""
    m = mask.bool()
    x = torch.where(m[..., None], points.to(F64), torch.zeros((), dtype=F64, device=points.device))
    return x, m.to(F64)


def _active_dims(x: torch.Tensor) -> torch.Tensor:
    """[B,d] float: 1 where some valid point is non-zero (coordinates beyond task.d are all zero)."""
    return (x != 0).any(dim=1).to(F64)


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[B,n,k] squared Euclidean distances, by expansion (batched matmul) in float64."""
    d2 = (x * x).sum(-1)[..., None] - 2 * torch.bmm(x, c.transpose(1, 2)) + (c * c).sum(-1)[:, None, :]
    return d2.clamp(min=0)


def _neg_inf_pad(values: torch.Tensor, kmask: torch.Tensor) -> torch.Tensor:
    return values.masked_fill(~kmask.bool()[:, None, :], -math.inf)


def em(points: torch.Tensor, mask: torch.Tensor, kmask: torch.Tensor, init: torch.Tensor, iters: int,
       covariance: Literal["spherical", "diag"] = "spherical", reg: float = 1e-6) -> EMResult:
    """`iters` EM iterations from centroids `init`, with uniform initial weights and one shared initial
    variance: the mean squared distance of valid points to their nearest init centroid, per coordinate."""
    if covariance not in ("spherical", "diag"):
        raise ValueError(f"covariance must be 'spherical' or 'diag', got {covariance!r}")
    out_dtype = points.dtype if points.dtype.is_floating_point else torch.float32
    x, m = _prepare(points, mask)
    km = kmask.bool()
    kf = km.to(F64)
    dims = _active_dims(x)  # [B,d]
    n_dims = dims.sum(-1).clamp(min=1)  # [B]
    n_valid = m.sum(-1).clamp(min=1)  # [B]

    means = init.to(F64) * kf[..., None]
    weights = kf / kf.sum(-1, keepdim=True).clamp(min=1)
    nearest = _neg_inf_pad(-_sq_dist(x, means), km).amax(-1).neg()  # [B,n] squared distance to nearest
    shared = (nearest * m).sum(-1) / (n_valid * n_dims) + reg  # [B]
    if covariance == "spherical":
        variances = shared[:, None].expand(-1, means.shape[1]).clone()
    else:
        variances = shared[:, None, None].expand(-1, means.shape[1], x.shape[-1]).clone()

    def e_step() -> torch.Tensor:
        if covariance == "spherical":
            log_lik = -0.5 * (_sq_dist(x, means) / variances[:, None, :]
                              + n_dims[:, None, None] * torch.log(variances)[:, None, :])
        else:
            prec = 1.0 / variances  # [B,k,d]
            # Σ_j (x_j − μ_j)² / v_j expanded into matmuls; padded coordinates have x = μ = 0.
            maha = (torch.bmm(x * x, prec.transpose(1, 2)) - 2 * torch.bmm(x, (means * prec).transpose(1, 2))
                    + (means * means * prec).sum(-1)[:, None, :]).clamp(min=0)
            log_lik = -0.5 * (maha + (torch.log(variances) * dims[:, None, :]).sum(-1)[:, None, :])
        log_joint = _neg_inf_pad(log_lik + torch.log(weights)[:, None, :], km)
        return log_joint - torch.logsumexp(log_joint, dim=-1, keepdim=True)

    for _ in range(iters):
        resp = e_step().exp() * m[..., None]  # [B,n,k]
        mass = resp.sum(1) + _MASS_EPS  # [B,k]
        weights = torch.where(km, mass / n_valid[:, None], torch.zeros_like(mass))
        new_means = torch.bmm(resp.transpose(1, 2), x) / mass[..., None]
        means = torch.where(km[..., None], new_means, means)
        # E[x²] − E[x]² per coordinate (sklearn's diag estimator, by expansion), then reg.
        avg_x2 = torch.bmm(resp.transpose(1, 2), x * x) / mass[..., None]
        per_dim = (avg_x2 - new_means * new_means).clamp(min=0)
        if covariance == "spherical":
            variances = (per_dim * dims[:, None, :]).sum(-1) / n_dims[:, None] + reg
        else:
            variances = per_dim + reg
        variances = torch.where(km if covariance == "spherical" else km[..., None], variances,
                                torch.ones_like(variances))  # padded clusters: any positive value
    log_resp = e_step()
    return EMResult(means=means.to(out_dtype), weights=weights.to(out_dtype), variances=variances.to(out_dtype),
                    log_resp=log_resp.float())


def _nearest(x: torch.Tensor, centroids: torch.Tensor, kmask: torch.Tensor) -> torch.Tensor:
    return _neg_inf_pad(-_sq_dist(x, centroids), kmask.bool()).argmax(-1)


def lloyd(points: torch.Tensor, mask: torch.Tensor, kmask: torch.Tensor, init: torch.Tensor,
          iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`iters` Lloyd iterations from `init`; returns (centroids [B,k,d], labels [B,n] with -1 on padding),
    the labels being the nearest final centroid (as sklearn's labels_). An empty cluster keeps its centroid."""
    out_dtype = points.dtype if points.dtype.is_floating_point else torch.float32
    x, m = _prepare(points, mask)
    km = kmask.bool()
    centroids = init.to(F64) * km.to(F64)[..., None]
    k = centroids.shape[1]
    for _ in range(iters):
        assign = torch.nn.functional.one_hot(_nearest(x, centroids, km), k).to(F64) * m[..., None]
        count = assign.sum(1)  # [B,k]
        sums = torch.bmm(assign.transpose(1, 2), x)
        keep = (count == 0)[..., None] | ~km[..., None]
        centroids = torch.where(keep, centroids, sums / count.clamp(min=1)[..., None])
    labels = _nearest(x, centroids, km).masked_fill(~mask.bool(), -1)
    return centroids.to(out_dtype), labels


# ---------------------------------------------------------------------------------------------- inits
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
    closest = ((x - x[rows, chosen[:, 0]][:, None, :]) ** 2).sum(-1)  # [B,n]
    for j in range(1, k):
        weight = closest * m
        weight = torch.where(weight.sum(-1, keepdim=True) > 0, weight, m)
        pick = _d2_sample(weight, uniforms[:, j])
        pick = torch.where(kmask[:, j].bool(), pick, chosen[:, 0])
        chosen[:, j] = pick
        closest = torch.minimum(closest, ((x - x[rows, pick][:, None, :]) ** 2).sum(-1))
    return chosen


def _gather_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(points, 1, idx[..., None].expand(-1, -1, points.shape[-1]))


def kmeans_plus_plus(points: torch.Tensor, mask: torch.Tensor, kmask: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """k-means++ centroids [B,k,d] (padded clusters 0): the first a valid point chosen by uniforms[:,0],
    centre j a valid point drawn ∝ squared distance to the nearest chosen centre by uniforms[:,j]."""
    x, m = _prepare(points, mask)
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
    """
    x, m = _prepare(points, mask)
    km = kmask.bool()
    batch, n, _ = x.shape
    k_pad = km.shape[1]
    valid = m.bool()
    pair = valid[:, :, None] & valid[:, None, :]
    d2 = _sq_dist(x, x)
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
    count = assign.sum(1)
    centroids = torch.bmm(assign.transpose(1, 2), x) / count.clamp(min=1)[..., None]
    centroids = torch.where((count > 0)[..., None], centroids, _gather_points(x, seeds))
    out_dtype = points.dtype if points.dtype.is_floating_point else torch.float32
    return (centroids * km.to(F64)[..., None]).to(out_dtype)


# ---------------------------------------------------------------------------------------------- oracle
def oracle_log_posterior(batch: dict[str, torch.Tensor], spec) -> torch.Tensor:
    """log p(z = j | x) [B,n,k] under the true model: means, weights, per-axis scales and the spec's noise
    (Gaussian, or per-axis Student-t with spec.noise_df scaled to unit variance). Padded clusters -inf."""
    d = spec.d  # coordinates beyond task.d are padding (scale 0)
    x = batch["points"][..., :d].to(F64)
    mu = batch["means"][..., :d].to(F64)
    scales = batch["scales"][:, :d].to(F64)
    z = (x[:, :, None, :] - mu[:, None, :, :]) / scales[:, None, None, :]  # [B,n,k,d]
    if spec.noise == "student_t":
        df = float(spec.noise_df)
        unit = (df - 2) / df  # the sampled noise is t · sqrt((ν−2)/ν)
        log_lik = -0.5 * (df + 1) * torch.log1p(z * z / (unit * df)).sum(-1)
    else:
        log_lik = -0.5 * (z * z).sum(-1)
    # The normalising constants (Σ log scales, Student-t constants) are the same for every component.
    log_joint = _neg_inf_pad(log_lik + torch.log(batch["weights"].to(F64))[:, None, :], batch["kmask"])
    return (log_joint - torch.logsumexp(log_joint, dim=-1, keepdim=True)).float()


def em_covariance(spec) -> str:
    """The EM variant that matches a task's noise: diagonal noise → 'diag', otherwise 'spherical'."""
    return "diag" if spec.noise == "diagonal" else "spherical"


def episode_uniforms(batch: dict[str, torch.Tensor], k: int, stream: int = 0) -> torch.Tensor:
    """[B,k] uniforms of each episode for the baselines' own inits, keyed by (seed, index, stream) on
    Philox streams apart from the episode's sampling ones (which use key (seed, index) with counter 0)."""
    rows = [np.random.Generator(np.random.Philox(key=[int(s), int(i)], counter=[0, 0, 1 + stream, 0])).random(k)
            for s, i in zip(batch["seed"].tolist(), batch["index"].tolist())]
    return torch.from_numpy(np.stack(rows)).to(batch["points"].device)


def baseline_init(batch: dict[str, torch.Tensor], spec) -> torch.Tensor:
    """The centroids EM and Lloyd start from: the task's init, or k-means++ when task.init = none."""
    if spec.init != "none":
        return batch["init"]
    uniforms = episode_uniforms(batch, batch["kmask"].shape[1]) if "seed" in batch and "index" in batch \
        else torch.full(batch["kmask"].shape, 0.5, dtype=F64, device=batch["points"].device)
    return kmeans_plus_plus(batch["points"], batch["mask"], batch["kmask"], uniforms)


def evaluate_baselines(batch: dict[str, torch.Tensor], spec, em_iters: int, depth: int | None = None) -> dict[str, torch.Tensor]:
    """Per-episode [B] float32 figures of EM, Lloyd (both from the task's init, k-means++ when there is
    none) and the oracle: err_* permutation-minimised, err_*_anchored against the anchored labels, loss_*
    the cross-entropy of the method's log-posterior against the anchored labels. With `depth`, also
    err_em_depth / err_em_depth_anchored: EM run for `depth` iterations (to set beside a depth-L model)."""
    points, mask, kmask, labels = batch["points"], batch["mask"], batch["kmask"], batch["labels"]
    k = kmask.shape[1]
    init = baseline_init(batch, spec)
    covariance = em_covariance(spec)
    out: dict[str, torch.Tensor] = {}

    fit = em(points, mask, kmask, init, em_iters, covariance)
    pred = fit.log_resp.argmax(-1)
    out["err_em"] = metrics.misclustering_rate(pred, labels, mask, k)
    out["err_em_anchored"] = metrics.anchored_error(pred, labels, mask)
    out["loss_em"] = metrics.cross_entropy(fit.log_resp, labels, mask)

    _, lloyd_labels = lloyd(points, mask, kmask, init, em_iters)
    out["err_lloyd"] = metrics.misclustering_rate(lloyd_labels, labels, mask, k)

    log_post = oracle_log_posterior(batch, spec)
    pred = log_post.argmax(-1)
    out["err_oracle"] = metrics.misclustering_rate(pred, labels, mask, k)
    out["err_oracle_anchored"] = metrics.anchored_error(pred, labels, mask)
    out["loss_oracle"] = metrics.cross_entropy(log_post, labels, mask)

    if depth is not None:
        fit = em(points, mask, kmask, init, depth, covariance)
        pred = fit.log_resp.argmax(-1)
        out["err_em_depth"] = metrics.misclustering_rate(pred, labels, mask, k)
        out["err_em_depth_anchored"] = metrics.anchored_error(pred, labels, mask)
    return {key: value.float() for key, value in out.items()}
