"""The `model.*` config section: the transformer's own settings (the task fixes its sizes).

Light (no torch): train/config.py puts it in the run config, which light commands read.
models/transformer.py extends it with the task's sizes into the `TransformerConfig` the model is built from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from emformer.errors import ConfigError


@dataclass
class ModelConfig:
    """The `model.*` config section: the architecture's own settings (the task sets the sizes)."""

    depth: int = 4
    """L: number of transformer blocks"""
    heads: int = 4
    """M: attention heads per block"""
    width: int = 64
    """D: residual stream width (must be divisible by heads)"""
    mlp_ratio: int = 4
    """hidden width of each MLP as a multiple of D"""
    dropout: float = 0.0
    centroid_head: bool = False
    """also read out refined centroids (trained with a matched-mean MSE term)"""
    count_head: bool = False
    """also predict P(k | X) from the point tokens (trained with cross-entropy on the episode's k; for
    n_clusters='auto')"""
    count_spectrum: bool = False
    """with count_head: the head also reads the episode's covariance spectrum (sorted eigenvalues over their
    mean, and log n): on standardized episodes that is where k shows, as k - 1 eigenvalues above the noise
    floor, and what a head over mean-pooled point tokens did not find (it stayed at the uniform prior)"""

    passes: int = 1
    """T: passes the model is trained and evaluated for; after each pass its centroids (the centroid head's,
    else the soft M-step of its assignment) are the next pass's centroid tokens, as an EM round's are, and
    the loss is taken at every pass (models/losses.py `iterated_loss`). 1: one pass, no iteration"""
    passes_min: Optional[int] = None
    """if set, each training batch runs T passes, T uniform in [passes_min, passes], a pure function of
    (data.seed, step), so any number of passes in that range is a refinement; evaluation and the Clusterer
    run `passes`"""
    grad_passes: Optional[int] = None
    """if set, only the last grad_passes passes of a training batch carry the loss and its gradient; the passes
    before run without gradient (truncated backpropagation through the passes, as looped models are trained),
    so a step costs those passes' forward only. null: every pass"""
    tied: bool = False
    """one block's weights for all `depth` blocks (a looped block: EM applies the same step each round)"""

    def validate(self, prefix: str = "model") -> "ModelConfig":
        """Raise ConfigError naming the first bad key; return self so calls chain."""

        def need(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"{prefix}.{key}: expected {expected}, got {getattr(self, key)!r}")

        need(self.depth >= 1, "depth", "an integer >= 1")
        need(self.heads >= 1, "heads", "an integer >= 1")
        need(self.width >= 1 and self.width % self.heads == 0, "width",
             f"a positive multiple of {prefix}.heads ({self.heads})")
        need(self.mlp_ratio >= 1, "mlp_ratio", "an integer >= 1")
        need(0 <= self.dropout < 1, "dropout", "a number in [0, 1)")
        need(self.passes >= 1, "passes", "an integer >= 1")
        need(self.passes_min is None or 1 <= self.passes_min <= self.passes, "passes_min",
             f"null or an integer in [1, {prefix}.passes ({self.passes})]")
        need(self.grad_passes is None or self.grad_passes >= 1, "grad_passes", "null or an integer >= 1")
        need(not self.count_spectrum or self.count_head, "count_spectrum", f"false unless {prefix}.count_head is true")
        return self
