"""Training losses (DESIGN §1, label anchoring).

With an init the targets are anchored (label j = the component matched to init centroid j), so the loss
is plain cross-entropy. Without one (init = none) labels are defined only up to permutation, and the loss
is the cross-entropy under the best relabelling. Because CE is a sum over points, the cost of mapping true
label a to slot b is S[a, b] = sum over points of label a of -log p_ib, and the best relabelling is an
assignment problem on S: `models.matching.best_assignment` solves it exactly (all permutations for small k,
Hungarian above). Every loss is the per-episode mean over valid points, then the mean over episodes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from emformer.matching import best_assignment
from emformer.precision import float32_region


def per_episode_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """logits [B,n,k] (padded clusters -inf), labels [B,n] (-1 = padding), mask [B,n] -> CE [B] (float32),
    the mean of -log softmax(logits)[label] over valid points, computed in `dtype` (the training loss in
    float32; the baselines' figures in float64, from log-posteriors that EM computes in float64)."""
    valid = mask.bool() & (labels >= 0)
    log_p = F.log_softmax(logits.to(dtype), dim=-1)
    nll = -log_p.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    nll = torch.where(valid, nll, torch.zeros_like(nll))  # where, not *: a -inf row on padding stays out
    return (nll.sum(1) / valid.sum(1).clamp(min=1)).float()


def anchored_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over episodes of the per-episode CE against the anchored labels."""
    return per_episode_cross_entropy(logits, labels, mask).mean()


def per_episode_permutation_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                                          kmask: torch.Tensor) -> torch.Tensor:
    """min over relabellings π of CE(logits, π(labels)) per episode [B] (exact)."""
    k = logits.shape[-1]
    valid = mask & (labels >= 0)
    log_p = F.log_softmax(logits.float(), dim=-1)
    # Padded slots are -inf; zero them here and forbid them in the assignment cost below.
    neg_log_p = (-log_p).masked_fill(~kmask.bool()[:, None, :], 0.0)
    onehot = F.one_hot(labels.clamp(min=0), k).to(neg_log_p.dtype) * valid[..., None]
    # S[b, true label a, slot b], a sum over n points: in float32 even under autocast, which would round it to
    # bf16 (8 bits of mantissa) and so mis-rank close relabellings and bias the loss.
    with float32_region(neg_log_p.device.type):
        cost = onehot.transpose(1, 2) @ neg_log_p
    forbidden = kmask.bool()[:, :, None] & ~kmask.bool()[:, None, :]  # a real cluster must go to a real slot
    with torch.no_grad():
        perm = best_assignment(cost.detach().masked_fill(forbidden, float("inf")))  # perm[b, a] = slot
    total = cost.gather(2, perm[..., None]).squeeze(-1).sum(1)
    return total / valid.sum(1).clamp(min=1)


def permutation_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                              kmask: torch.Tensor) -> torch.Tensor:
    """Mean over episodes of the permutation-minimised CE."""
    return per_episode_permutation_cross_entropy(logits, labels, mask, kmask).mean()


def centroid_mse(centroids: torch.Tensor, means: torch.Tensor, kmask: torch.Tensor,
                 sigma: torch.Tensor) -> torch.Tensor:
    """Mean over valid clusters of ||m̂_j - μ_j||² / σ² (anchored: centroid j estimates component j)."""
    sq = ((centroids.float() - means.float()) ** 2).sum(-1) / sigma.float()[:, None] ** 2
    kvalid = kmask.bool()
    per_episode = torch.where(kvalid, sq, torch.zeros_like(sq)).sum(1) / kvalid.sum(1).clamp(min=1)
    return per_episode.mean()


def count_loss(count_logits: torch.Tensor, k: torch.Tensor, k_min: int) -> torch.Tensor:
    """Per-episode cross-entropy [B] of the count head's logits against the episode's true k."""
    return F.cross_entropy(count_logits.float(), (k - k_min).long(), reduction="none")


def clustering_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], anchored: bool,
                    centroids: Optional[torch.Tensor] = None, centroid_weight: float = 1.0) -> torch.Tensor:
    """The training objective: anchored or permutation-minimised CE, plus the centroid term if given."""
    if anchored:
        loss = anchored_cross_entropy(logits, batch["labels"], batch["mask"])
    else:
        loss = permutation_cross_entropy(logits, batch["labels"], batch["mask"], batch["kmask"])
    if centroids is not None and anchored:
        # Without an init the centroid slots carry no identity, so the MSE term needs anchoring.
        loss = loss + centroid_weight * centroid_mse(centroids, batch["means"], batch["kmask"], batch["sigma"])
    return loss


def pass_weights(passes: int) -> list[float]:
    """Weights of the passes' losses, toward the last: pass t of T weighs 2t / (T (T + 1)) (they sum to 1;
    one pass weighs 1), so every pass must assign well while the last counts most."""
    total = passes * (passes + 1) / 2
    return [t / total for t in range(1, passes + 1)]


def iterated_loss(outputs: list[tuple[torch.Tensor, Optional[torch.Tensor]]], batch: dict[str, torch.Tensor],
                  anchored: bool) -> torch.Tensor:
    """`clustering_loss` at every pass of `ClusterTransformer.forward_passes`, weighted by `pass_weights`; one
    pass: exactly its clustering_loss."""
    losses = [clustering_loss(logits, batch, anchored, centroids) for logits, centroids in outputs]
    if len(losses) == 1:
        return losses[0]
    return sum(w * loss for w, loss in zip(pass_weights(len(losses)), losses))
