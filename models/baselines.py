"""Classical baselines, batched over episodes in torch with padding masks (DESIGN §2).

- `em`: EM for Gaussian mixtures with spherical (one variance per component, sklearn's 'spherical'), tied
  spherical (one variance shared by all components) or diagonal ('diag') covariances, weights estimated,
  `reg` added to variances like sklearn's reg_covar.
  One iteration = E-step then M-step, as sklearn counts them; the returned log_resp is a final E-step with
  the final parameters (what sklearn's fit_predict returns).
- `em_from_responsibilities`: the same EM started from a soft assignment (a model's), for the Clusterer's
  `em_steps` polish and its `n_init` score (the fitted mixture's log-likelihood).
- `lloyd`: Lloyd's k-means (lives in data/inits.py, which the spectral init needs it for). An empty cluster
  keeps its centroid (sklearn instead moves it to a far point).
- The initial centroids (k-means++, spectral, ...) are data/inits.py's registry.
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
from typing import Iterator, Literal

import numpy as np
import torch

from emformer.data import inits
from emformer.data.inits import F64, lloyd, neg_inf_pad, prepare_points, sq_dist
from emformer.data.tasks import TaskSpec
from emformer.models import metrics
from emformer.models.losses import per_episode_cross_entropy

# sklearn adds 10 * eps to every component's responsibility mass so an empty component divides safely.
_MASS_EPS = 10 * torch.finfo(F64).eps


@dataclass
class EMResult:
    means: torch.Tensor
    """[B,k,d]"""
    weights: torch.Tensor
    """[B,k] (0 on padded clusters)"""
    variances: torch.Tensor
    """[B,k] (spherical; tied: one value repeated) or [B,k,d] (diag)"""
    log_resp: torch.Tensor
    """[B,n,k] log responsibilities under the final parameters; padded clusters -inf"""
    log_likelihood: torch.Tensor
    """[B] float64 mean log-likelihood per valid point under the final parameters (coordinates that are zero
    for every point of an episode, i.e. padding, left out)"""


def _active_dims(x: torch.Tensor) -> torch.Tensor:
    """[B,d] float: 1 where some valid point is non-zero (coordinates beyond task.d are all zero)."""
    return (x != 0).any(dim=1).to(F64)


class _Mixture:
    """The E- and M-steps of EM on one padded batch (float64), shared by `em` and `em_from_responsibilities`."""

    def __init__(self, points: torch.Tensor, mask: torch.Tensor, kmask: torch.Tensor, covariance: str,
                 reg: float) -> None:
        if covariance not in ("spherical", "tied", "diag"):
            raise ValueError(f"covariance must be 'spherical', 'tied' or 'diag', got {covariance!r}")
        self.out_dtype = points.dtype if points.dtype.is_floating_point else torch.float32
        self.x, self.m = prepare_points(points, mask)
        self.km = kmask.bool()
        self.covariance, self.reg = covariance, reg
        self.dims = _active_dims(self.x)  # [B,d]
        self.n_dims = self.dims.sum(-1).clamp(min=1)  # [B]
        self.n_valid = self.m.sum(-1).clamp(min=1)  # [B]

    def log_joint(self, means: torch.Tensor, weights: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
        """[B,n,k] log w_j + log N(x_i; μ_j, Σ_j) up to the constant −(d/2) log 2π; padded clusters −inf."""
        x, dims = self.x, self.dims
        if self.covariance != "diag":  # spherical and tied: one variance per cluster, the same for all if tied
            log_lik = -0.5 * (sq_dist(x, means) / variances[:, None, :]
                              + self.n_dims[:, None, None] * torch.log(variances)[:, None, :])
        else:
            prec = 1.0 / variances  # [B,k,d]
            # Σ_j (x_j − μ_j)² / v_j expanded into matmuls; padded coordinates have x = μ = 0.
            maha = (torch.bmm(x * x, prec.transpose(1, 2)) - 2 * torch.bmm(x, (means * prec).transpose(1, 2))
                    + (means * means * prec).sum(-1)[:, None, :]).clamp(min=0)
            log_lik = -0.5 * (maha + (torch.log(variances) * dims[:, None, :]).sum(-1)[:, None, :])
        return neg_inf_pad(log_lik + torch.log(weights)[:, None, :], self.km)

    def m_step(self, resp: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights, means, variances) from responsibilities [B,n,k]; padded clusters keep `means`."""
        x, km = self.x, self.km
        resp = resp * self.m[..., None]
        mass = resp.sum(1) + _MASS_EPS  # [B,k]
        weights = torch.where(km, mass / self.n_valid[:, None], torch.zeros_like(mass))
        new_means = torch.bmm(resp.transpose(1, 2), x) / mass[..., None]
        means = torch.where(km[..., None], new_means, means)
        # E[x²] − E[x]² per coordinate (sklearn's diag estimator, by expansion), then reg.
        avg_x2 = torch.bmm(resp.transpose(1, 2), x * x) / mass[..., None]
        per_dim = (avg_x2 - new_means * new_means).clamp(min=0)
        if self.covariance == "diag":
            variances = per_dim + self.reg
        else:
            variances = (per_dim * self.dims[:, None, :]).sum(-1) / self.n_dims[:, None]
            if self.covariance == "tied":  # the clusters' variances pooled, weighted by their mass
                pooled = (variances * mass * km).sum(-1, keepdim=True) / (mass * km).sum(-1, keepdim=True)
                variances = pooled.expand_as(variances)
            variances = variances + self.reg
        variances = torch.where(km if self.covariance != "diag" else km[..., None], variances,
                                torch.ones_like(variances))  # padded clusters: any positive value
        return weights, means, variances

    def result(self, means: torch.Tensor, weights: torch.Tensor, variances: torch.Tensor) -> EMResult:
        """The final E-step: responsibilities and the mean log-likelihood per valid point."""
        log_joint = self.log_joint(means, weights, variances)
        log_marginal = torch.logsumexp(log_joint, dim=-1, keepdim=True)
        per_point = log_marginal[..., 0] - 0.5 * self.n_dims[:, None] * math.log(2 * math.pi)
        log_likelihood = (per_point * self.m).sum(-1) / self.n_valid
        dtype = self.out_dtype
        return EMResult(means=means.to(dtype), weights=weights.to(dtype), variances=variances.to(dtype),
                        log_resp=(log_joint - log_marginal).float(), log_likelihood=log_likelihood)


def em(points: torch.Tensor, mask: torch.Tensor, kmask: torch.Tensor, init: torch.Tensor, iters: int,
       covariance: Literal["spherical", "tied", "diag"] = "spherical", reg: float = 1e-6) -> EMResult:
    """`iters` EM iterations from centroids `init`, with uniform initial weights and one shared initial
    variance: the mean squared distance of valid points to their nearest init centroid, per coordinate."""
    mix = _Mixture(points, mask, kmask, covariance, reg)
    for parameters in _em_parameters(mix, init, iters, covariance, reg):
        pass
    return mix.result(*parameters)


def em_iterations(points: torch.Tensor, mask: torch.Tensor, kmask: torch.Tensor, init: torch.Tensor, iters: int,
                  covariance: Literal["spherical", "tied", "diag"] = "spherical", reg: float = 1e-6) -> list[EMResult]:
    """`em` after each of 1..iters iterations from the same start, in one run: entry t − 1 is what
    `em(..., iters=t)` returns."""
    mix = _Mixture(points, mask, kmask, covariance, reg)
    return [mix.result(*parameters) for parameters in _em_parameters(mix, init, iters, covariance, reg)][1:]


def _em_parameters(mix: _Mixture, init: torch.Tensor, iters: int, covariance: str, reg: float
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(means, weights, variances) at the start (see `em`) and after each of `iters` iterations."""
    kf = mix.km.to(F64)
    means = init.to(F64) * kf[..., None]
    weights = kf / kf.sum(-1, keepdim=True).clamp(min=1)
    nearest = neg_inf_pad(-sq_dist(mix.x, means), mix.km).amax(-1).neg()  # [B,n] squared distance to nearest
    shared = (nearest * mix.m).sum(-1) / (mix.n_valid * mix.n_dims) + reg  # [B]
    if covariance != "diag":
        variances = shared[:, None].expand(-1, means.shape[1]).clone()
    else:
        variances = shared[:, None, None].expand(-1, means.shape[1], mix.x.shape[-1]).clone()
    yield means, weights, variances
    for _ in range(iters):
        log_joint = mix.log_joint(means, weights, variances)
        resp = (log_joint - torch.logsumexp(log_joint, dim=-1, keepdim=True)).exp()
        weights, means, variances = mix.m_step(resp, means)
        yield means, weights, variances


def em_from_responsibilities(points: torch.Tensor, mask: torch.Tensor, kmask: torch.Tensor, resp: torch.Tensor,
                             iters: int, covariance: Literal["spherical", "tied", "diag"] = "spherical",
                             reg: float = 1e-6) -> EMResult:
    """EM started from a soft assignment resp [B,n,k] (e.g. a model's): the M-step of resp, then `iters` EM
    iterations (E-step, M-step), then the final E-step. iters = 0 fits the mixture of resp itself: its
    log_likelihood scores that assignment."""
    mix = _Mixture(points, mask, kmask, covariance, reg)
    means = torch.zeros(resp.shape[0], resp.shape[2], mix.x.shape[-1], dtype=F64, device=mix.x.device)
    weights, means, variances = mix.m_step(resp.to(F64), means)
    for _ in range(iters):
        log_joint = mix.log_joint(means, weights, variances)
        weights, means, variances = mix.m_step((log_joint - torch.logsumexp(log_joint, -1, keepdim=True)).exp(), means)
    return mix.result(means, weights, variances)


def oracle_log_posterior(batch: dict[str, torch.Tensor], spec: TaskSpec) -> torch.Tensor:
    """log p(z = j | x) [B,n,k] under the true model: means, weights, per-axis scales and the spec's noise
    (Gaussian, or per-axis Student-t with spec.noise_df scaled to unit variance). Padded clusters -inf."""
    d = spec.d  # coordinates beyond task.d are padding (scale 0)
    x = batch["points"][..., :d].to(F64)
    mu = batch["means"][..., :d].to(F64)
    scales = batch["scales"][:, :d].to(F64)
    z = (x[:, :, None, :] - mu[:, None, :, :]) / scales[:, None, None, :]  # [B,n,k,d]
    gauss = -0.5 * (z * z).sum(-1)
    if spec.noise in ("student_t", "mixed"):
        df = float(spec.noise_df)
        unit = (df - 2) / df  # the sampled noise is t · sqrt((ν−2)/ν)
        student = -0.5 * (df + 1) * torch.log1p(z * z / (unit * df)).sum(-1)
        if spec.noise == "mixed":
            if "noise_mode" not in batch:
                raise ValueError("task.noise = mixed: the batch has no 'noise_mode' (episodes of a mixed-noise "
                                 "task come from the fresh source, whose batches carry each episode's mode)")
            student = torch.where((batch["noise_mode"] == 2)[:, None, None], student, gauss)
        log_lik = student
    else:
        log_lik = gauss
    # The normalising constants (Σ log scales, Student-t constants) are the same for every component.
    log_joint = neg_inf_pad(log_lik + torch.log(batch["weights"].to(F64))[:, None, :], batch["kmask"])
    return (log_joint - torch.logsumexp(log_joint, dim=-1, keepdim=True)).float()


def em_covariance(spec: TaskSpec) -> str:
    """The EM variant that matches a task's noise: diagonal noise → 'diag', otherwise 'spherical' (mixed noise
    too: most of its episodes are isotropic or Student-t, and one EM for all keeps the comparison one)."""
    return "diag" if spec.noise == "diagonal" else "spherical"


def episode_uniforms(batch: dict[str, torch.Tensor], k: int, stream: int = 0) -> torch.Tensor:
    """[B,k] uniforms of each episode for the baselines' own inits, keyed by (seed, index, stream) on
    Philox streams apart from the episode's sampling ones (which use key (seed, index) with counter 0)."""
    rows = [np.random.Generator(np.random.Philox(key=[int(s), int(i)], counter=[0, 0, 1 + stream, 0])).random(k)
            for s, i in zip(batch["seed"].tolist(), batch["index"].tolist())]
    return torch.from_numpy(np.stack(rows)).to(batch["points"].device)


def baseline_init(batch: dict[str, torch.Tensor], spec: TaskSpec) -> torch.Tensor:
    """The centroids EM and Lloyd start from: the task's init, or k-means++ when task.init = none."""
    if spec.anchored:
        return batch["init"]
    uniforms = episode_uniforms(batch, batch["kmask"].shape[1]) if "seed" in batch and "index" in batch \
        else torch.full(batch["kmask"].shape, 0.5, dtype=F64, device=batch["points"].device)
    return inits.kmeans_plus_plus(batch["points"], batch["mask"], batch["kmask"], uniforms)


def init_figures(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-episode [B] float32 figures of the init alone, what a model given it must beat: err_init, the
    anchored error of "nearest initial centroid", and loss_init, the cross-entropy of the posterior of the
    initial centroids with the true σ and equal weights (DESIGN §3: the memorisation region's reference)."""
    points, init, mask, labels = batch["points"].double(), batch["init"].double(), batch["mask"], batch["labels"]
    kmask = batch["kmask"]
    dist = sq_dist(points, init)
    logits = neg_inf_pad(-dist / (2 * batch["sigma"].double()[:, None, None] ** 2), kmask)
    return {"err_init": metrics.anchored_error(logits.argmax(-1), labels, mask).float(),
            "loss_init": per_episode_cross_entropy(logits, labels, mask, dtype=torch.float64)}


def evaluate_baselines(batch: dict[str, torch.Tensor], spec: TaskSpec, em_iters: int, depth: int | None = None) -> dict[str, torch.Tensor]:
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
    out["loss_em"] = per_episode_cross_entropy(fit.log_resp, labels, mask, dtype=torch.float64)

    _, lloyd_labels = lloyd(points, mask, kmask, init, em_iters)
    out["err_lloyd"] = metrics.misclustering_rate(lloyd_labels, labels, mask, k)

    log_post = oracle_log_posterior(batch, spec)
    pred = log_post.argmax(-1)
    out["err_oracle"] = metrics.misclustering_rate(pred, labels, mask, k)
    out["err_oracle_anchored"] = metrics.anchored_error(pred, labels, mask)
    out["loss_oracle"] = per_episode_cross_entropy(log_post, labels, mask, dtype=torch.float64)

    if depth is not None:
        fit = em(points, mask, kmask, init, depth, covariance)
        pred = fit.log_resp.argmax(-1)
        out["err_em_depth"] = metrics.misclustering_rate(pred, labels, mask, k)
        out["err_em_depth_anchored"] = metrics.anchored_error(pred, labels, mask)
    return {key: value.float() for key, value in out.items()}


def em_iteration_errors(batch: dict[str, torch.Tensor], spec: TaskSpec, iters: int) -> torch.Tensor:
    """[B, iters] float32: EM's permutation-minimised err after t = 1..iters iterations, from the start and
    with the covariance of `evaluate_baselines` (its err_em is column em_iters − 1, run that far)."""
    points, mask, kmask, labels = batch["points"], batch["mask"], batch["kmask"], batch["labels"]
    fits = em_iterations(points, mask, kmask, baseline_init(batch, spec), iters, em_covariance(spec))
    return torch.stack([metrics.misclustering_rate(fit.log_resp.argmax(-1), labels, mask, kmask.shape[1])
                        for fit in fits], dim=1).float()
