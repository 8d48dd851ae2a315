"""The clustering transformer of DESIGN §2, top to bottom like the math.

An episode is n points x_1..x_n in R^d and k initial centroids m_1..m_k. Every one becomes a token:

    point token     t_i = E x_i + e_point                    (E: one linear map shared by points and centroids)
    centroid token  c_j = E m_j + e_centroid                 (or a learned slot vector s_j when there is no init)

The n + k tokens go through L pre-LN blocks (multi-head softmax self-attention, then an MLP, each added to
the residual stream); padded points and padded clusters are masked out as keys. When nothing can be padded
(fixed n and k) the caller passes no masks, and attention runs without a mask so that a GPU may use its
flash or memory-efficient kernels (a boolean mask rules them out). After a final LayerNorm,
point i scores centroid token j:

    logits_ij = <W_q h_i, W_k c_j> / sqrt(D)                 (padded clusters: -inf)

so softmax_j(logits_ij) is a soft assignment, the role of the E-step. An optional head reads refined
centroids m_j + W_c c_j (the M-step).

Iterating (model.passes = T): pass t + 1 takes as centroid tokens the centroids pass t ends with, the head's
refined centroids where the model has the head, else the exact soft M-step of its assignment

    m_j  <-  sum_i r_ij x_i / sum_i r_ij,    r_ij = softmax_j(logits_ij)   (a cluster without mass keeps m_j)

so T passes are T rounds of an EM-like loop whose step is the whole network. With model.tied the L blocks
share one block's weights (a looped block, as EM applies one step again and again).

Unknown k: an optional count head predicts P(k | X) for k in [k_min, k_max] from the point tokens alone.
The same blocks run over the n point tokens with no centroid tokens (so nothing says how many clusters the
init had), the final states are mean-pooled over the real points, and an MLP reads k's logits:

    count_logits = MLP(mean_i LN(h_i))                       (h: the blocks over point tokens only)

With count_spectrum the MLP also reads the episode's covariance spectrum (`covariance_spectrum`): once X is
standardized, k shows as k - 1 eigenvalues above the noise floor, which mean-pooled tokens did not learn to see.

There is no positional encoding, so permuting the points permutes the output rows and nothing else. This file
imports torch only (no lightning): export and `cluster` use it. Under mixed precision the read-out runs in
float32 (`float32_region`): it is two small matmuls, and bf16 would quantise the logits.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from emformer.data.tasks import TaskSpec
from emformer.models.config import ModelConfig
from emformer.precision import float32_region


@dataclass
class TransformerConfig(ModelConfig):
    """Everything needed to rebuild the model (stored in checkpoints and exports): the model section plus
    what the task fixes. Built from a run by `from_task_and_model`, from an export by `from_dict`."""

    d_in: int = 8
    """input dimension (the task's padded d)"""
    k_max: int = 3
    """number of centroid tokens (the task's padded k)"""
    learned_centroids: bool = False
    """init = none: centroid tokens are learned slot vectors instead of embedded initial centroids"""
    k_min: int = 2
    """smallest k the count head scores (the task's k)"""

    @classmethod
    def from_task_and_model(cls, task: TaskSpec, model: ModelConfig) -> "TransformerConfig":
        """The one derivation of the architecture from a run: the model section + the task's padded sizes."""
        return cls(**dataclasses.asdict(model), d_in=task.d_pad, k_max=task.k_pad,
                   learned_centroids=not task.anchored, k_min=task.k)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TransformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TransformerConfig key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**values)


class SelfAttention(nn.Module):
    """Multi-head softmax attention over all tokens; `keep [B, T]` says which tokens may be attended to
    (None: every token, and no mask reaches scaled_dot_product_attention)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        shape = (batch, tokens, self.heads, width // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # [B, M, T, D/M]
        attn_mask = None if keep is None else keep[:, None, None, :]  # True = may attend; over heads, queries
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, tokens, width))


class MLP(nn.Module):
    def __init__(self, width: int, ratio: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(width, ratio * width)
        self.down = nn.Linear(ratio * width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    """Pre-LN: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.width)
        self.attn = SelfAttention(cfg.width, cfg.heads, cfg.dropout)
        self.ln_mlp = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg.width, cfg.mlp_ratio, cfg.dropout)

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), keep)
        return x + self.mlp(self.ln_mlp(x))


class ClusterTransformer(nn.Module):
    """points [B,n,d], mask [B,n], init [B,k,d], kmask [B,k] -> logits [B,n,k] (padded clusters -inf).

    mask / kmask None: no point / no cluster is padded (the fast path of fixed-size tasks)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width ({cfg.width}) must be a multiple of heads ({cfg.heads})")
        self.cfg = cfg
        self.embed = nn.Linear(cfg.d_in, cfg.width)  # shared by points and centroids: same space
        self.type_point = nn.Parameter(torch.zeros(cfg.width))
        self.type_centroid = nn.Parameter(torch.zeros(cfg.width))
        self.slots = nn.Parameter(torch.randn(cfg.k_max, cfg.width) * 0.02) if cfg.learned_centroids else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(1 if cfg.tied else cfg.depth))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.read_point = nn.Linear(cfg.width, cfg.width, bias=False)  # W_q
        self.read_centroid = nn.Linear(cfg.width, cfg.width, bias=False)  # W_k
        self.centroid_head = nn.Linear(cfg.width, cfg.d_in) if cfg.centroid_head else None
        if self.centroid_head is not None:
            # Start at "refined = init": the head learns a correction.
            nn.init.zeros_(self.centroid_head.weight)
            nn.init.zeros_(self.centroid_head.bias)
        self.count_head = None
        if cfg.count_head:
            inputs = cfg.width + (cfg.d_in + 1 if cfg.count_spectrum else 0)
            self.count_head = nn.Sequential(nn.Linear(inputs, cfg.width), nn.GELU(),
                                            nn.Linear(cfg.width, cfg.k_max - cfg.k_min + 1))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def layers(self) -> list[Block]:
        """The `depth` blocks in the order they run (one block `depth` times when tied)."""
        return [self.blocks[0]] * self.cfg.depth if self.cfg.tied else list(self.blocks)

    def forward(self, points: torch.Tensor, mask: Optional[torch.Tensor], init: torch.Tensor,
                kmask: Optional[torch.Tensor], every_pass: bool = False) -> torch.Tensor:
        """The last pass's logits after the passes the model was trained for (cfg.passes); with `every_pass`
        each pass's, stacked [passes, B, n, k]. Through forward, not forward_passes, so that hooks which gather
        a sharded model's parameters for a forward (DeepSpeed ZeRO-3's) run."""
        outputs = self.forward_passes(points, mask, init, kmask)
        return torch.stack([logits for logits, _ in outputs]) if every_pass else outputs[-1][0]

    def forward_passes(self, points: torch.Tensor, mask: Optional[torch.Tensor], init: torch.Tensor,
                       kmask: Optional[torch.Tensor], passes: Optional[int] = None, detached: int = 0
                       ) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """(logits, head centroids) of each of `passes` passes (default cfg.passes), each pass started from
        the centroids the previous one ends with (`next_centroids`). The first `detached` passes run without
        gradient (their outputs are constants; training's model.grad_passes)."""
        outputs = []
        centroids = init
        for t in range(self.cfg.passes if passes is None else passes):
            with torch.set_grad_enabled(torch.is_grad_enabled() and t >= detached):
                if t:
                    centroids = next_centroids(*outputs[-1], points, mask, centroids)
                outputs.append(self.forward_with_centroids(points, mask, centroids, kmask))
        return outputs

    def forward_with_centroids(self, points: torch.Tensor, mask: Optional[torch.Tensor], init: torch.Tensor,
                               kmask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        n = points.shape[1]
        point_tokens = self.embed(points) + self.type_point
        if self.slots is None:
            centroid_tokens = self.embed(init) + self.type_centroid
        else:
            centroid_tokens = (self.slots + self.type_centroid).expand(points.shape[0], -1, -1)
        x = torch.cat([point_tokens, centroid_tokens], dim=1)  # [B, n + k, D]
        keep = None
        if mask is not None or kmask is not None:
            batch, k = points.shape[0], centroid_tokens.shape[1]
            keep = torch.cat([mask.bool() if mask is not None else points.new_ones(batch, n, dtype=torch.bool),
                              kmask.bool() if kmask is not None else points.new_ones(batch, k, dtype=torch.bool)],
                             dim=1)
        for block in self.layers():
            x = block(x, keep)
        x = self.ln_final(x)
        h, c = x[:, :n], x[:, n:]
        # The read-out in the weights' dtype even under autocast (float32 but where DeepSpeed cast the weights
        # to bf16): bf16 logits are quantised (steps of 0.125 from 16 up), which the loss and near-ties see.
        with float32_region(x.device.type):
            dtype = self.read_point.weight.dtype
            logits = (self.read_point(h.to(dtype)) @ self.read_centroid(c.to(dtype)).transpose(1, 2)
                      / math.sqrt(self.cfg.width))
        if kmask is not None:
            logits = logits.masked_fill(~kmask.bool()[:, None, :], float("-inf"))
        centroids = None
        if self.centroid_head is not None:
            centroids = init + self.centroid_head(c).to(init.dtype)
            if kmask is not None:
                centroids = centroids * kmask[..., None]
        return logits, centroids

    def count_logits(self, points: torch.Tensor, mask: Optional[torch.Tensor],
                     spectrum: Optional[torch.Tensor] = None) -> torch.Tensor:
        """points [B,n,d], mask [B,n] (None: no padded point) -> logits [B, k_max - k_min + 1] of
        k = k_min..k_max (needs count_head). `spectrum`: `covariance_spectrum(points, mask)` when the caller
        has it already (training computes it on the host, where its eigvalsh costs no device sync)."""
        if self.count_head is None:
            raise ValueError("this model has no count head (model.count_head was false when it was trained)")
        x = self.embed(points) + self.type_point
        keep = None if mask is None else mask.bool()
        for block in self.layers():
            x = block(x, keep)
        h = self.ln_final(x)
        if keep is None:
            pooled = h.mean(1)
        else:
            m = keep[..., None].to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        if self.cfg.count_spectrum:
            spectrum = covariance_spectrum(points, keep) if spectrum is None else spectrum
            pooled = torch.cat([pooled, spectrum.to(pooled.dtype)], -1)
        return self.count_head(pooled)


def soft_assignment(logits: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """logits [B,n,k] (padded clusters -inf), mask [B,n] (None: every point real) -> float32 responsibilities
    [B,n,k], zero on padded points and padded clusters."""
    proba = torch.softmax(logits.float(), dim=-1).nan_to_num(0.0)
    return proba if mask is None else proba * mask[..., None].to(proba.dtype)


def soft_centroids(proba: torch.Tensor, points: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """The exact soft M-step: responsibility-weighted means [B,k,d] of points [B,n,d] under proba [B,n,k]
    (`soft_assignment`); a cluster with (almost) no mass, a padded one included, keeps its `previous` centroid."""
    with float32_region(points.device.type):
        mass = proba.sum(1)
        soft = proba.transpose(1, 2) @ points.float() / mass.clamp(min=1e-12)[..., None]
        return torch.where((mass > 1e-6)[..., None], soft, previous.float()).to(previous.dtype)


def next_centroids(logits: torch.Tensor, head: Optional[torch.Tensor], points: torch.Tensor,
                   mask: Optional[torch.Tensor], previous: torch.Tensor) -> torch.Tensor:
    """The centroid tokens of the next pass: the centroid head's output where the model has one, else the soft
    M-step of this pass's assignment."""
    if head is not None:
        return head
    return soft_centroids(soft_assignment(logits, mask), points, previous)


def covariance_spectrum(points: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """[B,n,d] points (mask [B,n], None: all real) -> [B, d + 1]: the square roots of their covariance's
    eigenvalues, largest first, over the mean eigenvalue of the coordinates with spread (so scale-free;
    zero-padded coordinates give zeros), then log n. A spherical k-mixture has k - 1 eigenvalues above the
    noise floor; sampling spreads the floor by ~sqrt(d / n), hence log n. No gradient: a function of the input."""
    with torch.no_grad():
        x = points.double()
        m = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
        count = m.sum(1).clamp(min=1)
        centred = (x - (x * m[..., None]).sum(1, keepdim=True) / count[:, None, None]) * m[..., None]
        cov = centred.transpose(1, 2) @ centred / count[:, None, None]
        eig = torch.linalg.eigvalsh(cov).flip(-1).clamp(min=0)
        variance = torch.diagonal(cov, dim1=1, dim2=2)
        dims = (variance > 1e-12 * variance.amax(-1, keepdim=True)).sum(-1).clamp(min=1)
        mean = (eig.sum(-1) / dims).clamp(min=torch.finfo(x.dtype).tiny)
        return torch.cat([(eig / mean[:, None]).sqrt(), count.log()[:, None]], -1).to(points.dtype)
