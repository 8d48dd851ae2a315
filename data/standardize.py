"""The one standardisation rule of episodes: training episodes under `task.standardize` and the `Clusterer`'s
input both go through `standardization`, so a model trained on standardised episodes sees user data exactly
as it saw its training data (a count head trained on raw episodes reads k off the absolute noise scale, which
the Clusterer's standardisation removes).

The rule, per episode over its real points: centre on the mean point; divide by one common scale (isotropic,
the clusters keep their shape) so that the mean variance of the coordinates with spread is target² — or,
per_feature, each coordinate to variance target² (scikit-learn's StandardScaler). Coordinates without spread
(zero padding beyond an episode's own d, a constant column) do not count.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from emformer import exact

STANDARD_SCALE = 1.0
"""the per-coordinate spread standardised training episodes get (task.standardize), and so the target of
the Clusterer's standardisation for a model trained on them"""


class Standardization(NamedTuple):
    """Per episode, float64: z = (x - mean) / scale. var is the per-coordinate variance (before any pooling);
    flat [B] marks episodes without any spread (scale 1 there, so nothing is divided by 0)."""

    mean: torch.Tensor  # [B, 1, d]
    scale: torch.Tensor  # [B, 1, d]
    var: torch.Tensor  # [B, 1, d]
    flat: torch.Tensor  # [B] bool


def standardization(x: torch.Tensor, mask: torch.Tensor, per_feature: bool = False,
                    target: float = STANDARD_SCALE, own_only: bool = True) -> Standardization:
    """The standardisation of episodes x [B, n, d] over their real points (mask [B, n]), in float64, with
    `emformer.exact`'s fixed-order sums and square root (training episodes go through it).

    own_only: the isotropic scale pools the variance over the coordinates with spread only, so zero padding
    (an episode's coordinates beyond its own d) or a constant column does not shrink it: an episode reads the
    same with or without them. False pools over all d (the rule of exports whose config.json has no
    task.standardize key). A coordinate's variance counts as spread when it exceeds 1e-24 · (1 + max mean²):
    below that it is rounding (a feature without spread gets scale 1).
    """
    x = x.double()
    m = mask[..., None].double()
    count = m.sum(1, keepdim=True).clamp(min=1)  # a count: exact in any order
    mean = exact.fsum(x * m, 1, keepdim=True) / count
    centred = (x - mean) * m
    var = exact.fsum(centred * centred, 1, keepdim=True) / count
    tiny = 1e-24 * (1 + (mean * mean).amax(-1, keepdim=True))
    flat = ~(var > tiny).any(-1).flatten()
    pooled = var
    if not per_feature:
        own = (var > tiny).sum(-1, keepdim=True).clamp(min=1) if own_only else var.shape[-1]
        pooled = (exact.fsum(var, -1, keepdim=True) / own).expand_as(var)
    std = torch.where(pooled > tiny, exact.sqrt(pooled), torch.ones_like(pooled))
    return Standardization(mean, std / target, var, flat)
