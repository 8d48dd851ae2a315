"""The LightningModule: the transformer, its loss, AdamW with warmup + cosine, and the evaluation.

Evaluation is not Lightning's validation loop: the callback in `train/callbacks.py` calls `evaluate()` every
`trainer.val_every` steps on every rank at once (the eval set is the same everywhere and small), so there is
no sampler and no rank can be left waiting. The baselines (EM, Lloyd, oracle) do not change during training:
they are computed once per eval set and cached.

The checkpoint's `hyper_parameters` hold the resolved run config as a plain dict under "config" (no
OmegaConf objects, so checkpoints load with weights_only=True), and the model weights sit under
`state_dict` with the prefix "model.", so export can rebuild the model from the checkpoint alone.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Optional

import lightning as L
import numpy as np
import torch

from emformer.data.episodes import Batch, batch_chunks
from emformer.data.permutation import keyed_uniform
from emformer.data.stream import eval_set, pool_eval_set
from emformer.models import baselines
from emformer.models.losses import count_loss, iterated_loss
from emformer.models.transformer import ClusterTransformer, TransformerConfig, covariance_spectrum
from emformer.train.config import to_run_config
from emformer.train.scoring import model_inputs, score_episodes


EPISODE_BASELINE_KEYS = ("err_em", "loss_em", "err_lloyd", "err_oracle", "loss_oracle", "err_init", "loss_init")
"""the baselines' per-episode figures kept in a run's episode results"""
PASSES_TAG = 0x50415353
"""keeps the per-step draw of T apart from the other keyed draws of (seed, step)"""


class WarmupCosine:
    """lr multiplier: linear 0 -> 1 over warmup steps, then cosine 1 -> min_ratio at max_steps.

    A class (not a lambda) so LambdaLR's state_dict keeps its numbers in the checkpoint.
    """

    def __init__(self, warmup_steps: int, max_steps: int, min_ratio: float) -> None:
        self.warmup_steps, self.max_steps, self.min_ratio = int(warmup_steps), int(max_steps), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ClusterModule(L.LightningModule):
    """Trains a ClusterTransformer on episodes; `config` is the resolved run config as a plain dict (what the
    checkpoint's hyper-parameters hold), typed once here as `self.run_config`."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.config = config
        self.run_config = to_run_config(config)
        self.model_config = TransformerConfig.from_task_and_model(self.run_config.task, self.run_config.model)
        self.model = ClusterTransformer(self.model_config)
        task, model = self.run_config.task, self.run_config.model
        self.anchored = task.anchored
        self.padded = task.padded
        self.points_padded = task.n_max is not None  # the count pass sees points only: their mask alone matters
        # What the training step reads of a batch; the loader leaves out the rest (seed, index, ...), so it is
        # neither pinned nor copied to the device.
        keys = ["points", "mask", "init", "kmask", "labels"]
        if model.centroid_head and self.anchored:
            keys += ["means", "sigma"]
        if model.count_head:
            keys.append("k")
        self.step_keys = tuple(keys)
        # torch.compile of the training forward passes only (bound methods, so state_dict keys stay "model.*").
        compile_ = torch.compile if self.run_config.trainer.compile else (lambda fn: fn)
        self._train_forward = compile_(self.model.forward_passes)
        self._count_forward = compile_(self.model.count_logits)
        self._eval: Optional[dict[str, Any]] = None  # eval sets and cached baselines, built on first use
        self._last_val_scores: Optional[dict[str, torch.Tensor]] = None  # per episode, for episode_results

    # ------------------------------------------------------------------ training
    def forward(self, batch: Batch, passes: int = 1, detached: int = 0
                ) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        return self._train_forward(*model_inputs(batch, self.padded), passes, detached)

    def passes_at(self, step: int) -> int:
        """T of training step `step`: model.passes, or with model.passes_min uniform in [passes_min, passes],
        a pure function of (data.seed, step), so a resumed run draws what the uninterrupted one drew."""
        model = self.run_config.model
        if model.passes_min is None or model.passes_min == model.passes:
            return int(model.passes)
        span = model.passes - model.passes_min + 1
        draw = keyed_uniform(PASSES_TAG, self.run_config.data.seed, step)
        return int(model.passes_min) + min(span - 1, int(draw * span))

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """On the host, before the batch goes to the device: the count head's covariance spectrum (a float64
        eigvalsh of d x d matrices, cheap here; on a GPU its error check would wait for the device each step)."""
        if self.model.count_head is not None and self.model_config.count_spectrum:
            batch = {**batch, "spectrum": covariance_spectrum(batch["points"], batch["mask"])}
        return batch

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        passes = self.passes_at(int(self.global_step))
        grad_passes = self.run_config.model.grad_passes
        detached = 0 if grad_passes is None else max(passes - grad_passes, 0)
        loss = iterated_loss(self(batch, passes, detached)[detached:], batch, self.anchored)
        if self.model.count_head is not None:
            count_logits = self._count_forward(batch["points"], batch["mask"] if self.points_padded else None,
                                               batch.get("spectrum"))
            loss = loss + count_loss(count_logits, batch["k"], self.model_config.k_min).mean()
        return loss

    def configure_optimizers(self) -> Any:
        optim, trainer = self.run_config.optim, self.run_config.trainer
        # Weight decay on matrices only: not on biases, LayerNorm gains or the type/slot embeddings.
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "slots" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "slots" not in n)]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=optim.lr, betas=(optim.beta1, optim.beta2),
        )
        schedule = WarmupCosine(optim.warmup_steps, trainer.max_steps, optim.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def _eval_sets(self) -> dict[str, Any]:
        if self._eval is None:
            spec, ev = self.run_config.task, self.run_config.eval
            self._eval = {
                "spec": spec,
                "val": eval_set(spec, ev.seed, ev.episodes),
                "train": pool_eval_set(spec, self.run_config.data, ev.episodes),
                "baselines": None,
            }
        return self._eval

    def baseline_episodes(self) -> dict[str, torch.Tensor]:
        """Per-episode float64 figures of every evaluate_baselines key on the eval set (and err_init /
        loss_init when the task has an init), computed once, then cached: the baselines do not train."""
        sets = self._eval_sets()
        if sets["baselines"] is None:
            ev = self.run_config.eval
            chunks: dict[str, list[torch.Tensor]] = {}
            for part in batch_chunks(sets["val"], ev.batch_size):
                values = baselines.evaluate_baselines(part, sets["spec"], em_iters=ev.em_iters,
                                                      depth=int(self.model_config.depth))
                if self.anchored:
                    values.update(baselines.init_figures(part))
                for key, value in values.items():
                    chunks.setdefault(key, []).append(value.detach().double().cpu())
            sets["baselines"] = {key: torch.cat(vals) for key, vals in chunks.items()}
        return dict(sets["baselines"])

    def baseline_means(self) -> dict[str, float]:
        """Mean over the eval set of every baseline figure (`baseline_episodes`), and EM's / the oracle's by k."""
        per_episode = self.baseline_episodes()
        means = {key: float(value.mean()) for key, value in per_episode.items()}
        means.update(means_by_k(self._eval_sets()["val"]["k"],
                                {key: per_episode[key] for key in ("err_em", "err_oracle")}))
        return means

    def episode_results(self) -> dict[str, np.ndarray]:
        """The last evaluation's figures per eval episode, by index: points (valid points), k, and err / loss of
        the model and of the baselines (em, lloyd, oracle; init when the task has one), and for a model trained
        to iterate `iteration_episodes`, as rundir.write_episode_results stores them. Call after `evaluate()`."""
        if self._last_val_scores is None:
            raise RuntimeError("episode_results() needs an evaluate() first")
        val = self._eval_sets()["val"]
        figures = {"err_model": self._last_val_scores["err"], "loss_model": self._last_val_scores["loss"],
                   **{key: value for key, value in self.baseline_episodes().items()
                      if key in EPISODE_BASELINE_KEYS}}
        if self.run_config.model.passes > 1:
            figures.update(self.iteration_episodes())
        out = {"points": val["mask"].sum(1).numpy(), "k": val["k"].numpy()}
        out.update({key: value.double().numpy() for key, value in figures.items()})
        return out

    def iteration_episodes(self) -> dict[str, torch.Tensor]:
        """Per eval episode [E, T] (T = model.passes): err_pass, the model's err after each of its passes t,
        and err_em_iter, EM's after t iterations from the same start (the report's passes against EM
        iterations). A second look at the eval set, so only the final evaluation takes it."""
        sets, ev, passes = self._eval_sets(), self.run_config.eval, int(self.run_config.model.passes)
        model = self.score_per_episode(sets["val"], ev.batch_size, every_pass=True)["err_pass"]
        em = torch.cat([baselines.em_iteration_errors(part, sets["spec"], passes).double()
                        for part in batch_chunks(sets["val"], ev.batch_size)])
        return {"err_pass": model, "err_em_iter": em}

    def score_per_episode(self, batch: Batch, batch_size: int, every_pass: bool = False
                          ) -> dict[str, torch.Tensor]:
        """score_episodes on a fixed batch through the trainer's precision plugin, as the training step runs."""
        plugin = self.trainer.precision_plugin if self._trainer is not None else None

        def prepare(part: Batch) -> Batch:
            part = {key: value.to(self.device) for key, value in part.items()}
            return plugin.convert_input(part) if plugin is not None else part

        context = plugin.forward_context if plugin is not None else contextlib.nullcontext
        return score_episodes(self.model, batch, batch_size, padded=self.padded, points_padded=self.points_padded,
                              count=not every_pass, prepare=prepare, forward_context=context,
                              every_pass=every_pass)

    def score(self, batch: Batch, batch_size: int) -> dict[str, float]:
        """Model loss / err / err_anchored / ari (and k_acc / k_loss with a count head) on a fixed batch, in
        chunks, as means over episodes."""
        scores = self.score_per_episode(batch, batch_size)
        if batch is self._eval_sets()["val"]:
            self._last_val_scores = scores
        row = {key: float(scores[key].mean()) for key in ("loss", "err", "err_anchored", "ari")}
        if "k_correct" in scores:
            row.update(k_acc=float(scores["k_correct"].mean()), k_loss=float(scores["k_loss"].mean()))
        row.update(means_by_k(scores["k"], {"err": scores["err"]}))
        return row

    def evaluate(self) -> dict[str, float]:
        """One val row (without step/split): the model on the eval set, on training episodes, and baselines."""
        sets = self._eval_sets()
        batch_size = self.run_config.eval.batch_size
        row = self.score(sets["val"], batch_size)
        train = self.score(sets["train"], batch_size)
        row["train_loss"], row["train_err"] = train["loss"], train["err"]
        if "k_acc" in train:
            row["train_k_acc"] = train["k_acc"]
        row.update(self.baseline_means())
        return row


def means_by_k(k: torch.Tensor, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """{f"{name}_k{k}": mean over the episodes with that k} when the episodes have several k (none otherwise)."""
    ks = sorted(set(k.tolist()))
    if len(ks) < 2:
        return {}
    return {f"{name}_k{kk}": float(value[k == kk].double().mean()) for name, value in values.items() for kk in ks}
