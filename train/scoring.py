"""Scoring a model on a fixed episode set: the one loop behind the val rows of a training run
(`ClusterModule.score`) and the test-set figures that the export's model card and `report --test-shift` print
(`score_model`, never on the eval set a checkpoint was selected on)."""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Optional

from emformer.data.tasks import TaskSpec
from emformer.train.config import EvalConfig, RunConfig

if TYPE_CHECKING:
    import torch

    from emformer.data.episodes import Batch


def model_inputs(batch: Batch, padded: bool = True
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """The model's arguments; `padded=False` (fixed n and k: every mask is all-true) passes no masks, so
    attention runs unmasked and a GPU can use its flash / memory-efficient kernels."""
    if not padded:
        return batch["points"], None, batch["init"], None
    return batch["points"], batch["mask"], batch["init"], batch["kmask"]


def score_episodes(model: Any, batch: Batch, batch_size: int, padded: bool = True,
                   points_padded: Optional[bool] = None, count: bool = False,
                   prepare: Optional[Callable[[Batch], Batch]] = None,
                   forward_context: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
                   every_pass: bool = False) -> dict[str, torch.Tensor]:
    """Per-episode figures of a ClusterTransformer on `batch`, in chunks of `batch_size`, as tensors [B] on
    the host: loss (anchored or permutation-minimised CE, as the task's labels are), err (permutation-minimised),
    err_anchored and ari in float64, the episodes' k; with `count` (a model with a count head, on its own
    k range) also k_correct and k_loss.

    `prepare` turns a host chunk into what the model takes (device, dtype: a trainer's precision plugin casts
    floats to the compute dtype where the weights are cast, as DeepSpeed's bf16 does), and the forward runs
    under `forward_context()` (the plugin's autocast), so evaluation takes the training step's precision path.
    A model without init tokens (learned slots) gets the kmask widened to its slots and its logits cut back to
    the episodes' k, so a task with fewer clusters than the model has slots scores as its own. `padded` /
    `points_padded` (default: `padded`) False: the main / count pass gets no attention mask (see model_inputs).
    With `every_pass` also err_pass [B, T]: err after each of the model's T = cfg.passes passes."""
    # torch and the models (~2 s of CPU to import): `report` imports this module without evaluating a model.
    import torch

    from emformer.data.episodes import batch_chunks
    from emformer.models.losses import count_loss, per_episode_cross_entropy, per_episode_permutation_cross_entropy
    from emformer.models.metrics import adjusted_rand_index, anchored_error, misclustering_rate
    from emformer.models.transformer import covariance_spectrum

    slots = int(model.cfg.k_max)
    counting = count and model.count_head is not None
    count_masked = padded if points_padded is None else points_padded
    out: dict[str, list[torch.Tensor]] = {}
    was_training = model.training
    model.eval()
    # Episodes of a ranged n are scored shortest first, each chunk cut to its longest episode, so a chunk
    # costs what its points cost, not n_max padding for every episode; rows go back to their order at the end.
    lengths = batch["mask"].sum(1)
    order = torch.argsort(lengths, stable=True) if padded and bool((lengths < batch["mask"].shape[1]).any()) else None
    if order is not None:
        batch = {key: value.index_select(0, order) for key, value in batch.items()}
    try:
        with torch.no_grad():
            for part in batch_chunks(batch, batch_size):
                if order is not None:
                    part = trim_points(part)
                width = part["kmask"].shape[1]
                if model.cfg.learned_centroids and width < slots:
                    part = {**part, "kmask": torch.nn.functional.pad(part["kmask"], (0, slots - width))}
                if counting and model.cfg.count_spectrum:  # on the host, as the training step's (module.py)
                    part = {**part, "spectrum": covariance_spectrum(part["points"], part["mask"])}
                part = prepare(part) if prepare is not None else part
                with forward_context():
                    every = model(*model_inputs(part, padded), every_pass=True) if every_pass else None
                    logits = every[-1] if every_pass else model(*model_inputs(part, padded))
                logits = logits.float()[..., :width]
                labels, mask, kmask = part["labels"], part["mask"], part["kmask"][:, :width]
                pred = logits.argmax(-1)
                k = logits.shape[-1]
                loss = (per_episode_cross_entropy(logits, labels, mask) if not model.cfg.learned_centroids
                        else per_episode_permutation_cross_entropy(logits, labels, mask, kmask))
                values = {"loss": loss, "err": misclustering_rate(pred, labels, mask, k),
                          "err_anchored": anchored_error(pred, labels, mask),
                          "ari": adjusted_rand_index(pred, labels, mask, k), "k": part["k"]}
                if every_pass:
                    values["err_pass"] = torch.stack([misclustering_rate(each.float()[..., :width].argmax(-1),
                                                                         labels, mask, k) for each in every], dim=1)
                if counting:
                    with forward_context():
                        count_logits = model.count_logits(part["points"], part["mask"] if count_masked else None,
                                                          part.get("spectrum"))
                    count_logits = count_logits.float()
                    k_min = int(model.cfg.k_min)
                    values["k_correct"] = count_logits.argmax(-1) == part["k"] - k_min
                    values["k_loss"] = count_loss(count_logits, part["k"], k_min)
                for key, value in values.items():
                    out.setdefault(key, []).append(value.cpu() if key == "k" else value.double().cpu())
    finally:
        model.train(was_training)
    scores = {key: torch.cat(values) for key, values in out.items()}
    if order is not None:
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(len(order)))
        scores = {key: value.index_select(0, inverse) for key, value in scores.items()}
    return scores


POINT_KEYS = ("points", "labels", "mask")
"""the batch keys with one row per point (dimension 1 is the padded n)"""


def trim_points(part: Batch) -> Batch:
    """The chunk with its point rows cut to its longest episode (the padding beyond is masked out anyway)."""
    n = int(part["mask"].sum(1).max())
    return {key: value[:, :n] if key in POINT_KEYS else value for key, value in part.items()}


def score_model(model: Any, spec: TaskSpec, ev: EvalConfig, seed: int) -> dict[str, float]:
    """The model and the baselines on `eval.episodes` episodes of `spec` drawn with `seed`: means of err, loss,
    err_em, err_lloyd, err_oracle, loss_em, loss_oracle, and err_minus_em_se, the paired per-episode standard
    error of err − err_em (what 'beats EM' is judged against)."""
    # heavy, as in score_episodes
    import torch

    from emformer.data.stream import eval_set
    from emformer.models.baselines import evaluate_baselines

    batch = eval_set(spec, int(seed), ev.episodes)
    scores = score_episodes(model, batch, ev.batch_size)
    with torch.no_grad():
        baselines = evaluate_baselines(batch, spec, em_iters=ev.em_iters)
    err = scores["err"]
    metrics = {"err": float(err.mean()), "loss": float(scores["loss"].mean())}
    for key in ("err_em", "err_lloyd", "err_oracle", "loss_em", "loss_oracle"):
        metrics[key] = float(baselines[key].double().mean())
    diff = err - baselines["err_em"].double()
    metrics["err_minus_em_se"] = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else math.nan
    return metrics


def held_out_test_seed(run: RunConfig) -> int:
    """The run's test seed (eval.test_seed; checkpoints made before it existed get the schema's default)."""
    return int(run.eval.test_seed)
