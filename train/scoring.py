"""A trained model and the baselines scored on a held-out episode set: the test-set figures that the export's
model card and `report --test-shift` print (never the eval set a checkpoint was selected on)."""
from __future__ import annotations

import math
from typing import Any

from emformer.data.tasks import TaskSpec
from emformer.train.config import EvalConfig, RunConfig


def score_model(model: Any, spec: TaskSpec, ev: EvalConfig, seed: int) -> dict[str, float]:
    """The model and the baselines on `eval.episodes` episodes of `spec` drawn with `seed`: means of err, loss,
    err_em, err_lloyd, err_oracle, loss_em, loss_oracle, and err_minus_em_se, the paired per-episode standard
    error of err − err_em (what 'beats EM' is judged against)."""
    # torch and the models (~2 s of CPU to import): only `report --test-shift` and export evaluate models.
    import torch

    from emformer.data.episodes import batch_chunks
    from emformer.data.stream import eval_set
    from emformer.models.baselines import evaluate_baselines
    from emformer.models.losses import per_episode_cross_entropy, per_episode_permutation_cross_entropy
    from emformer.models.metrics import misclustering_rate

    batch = eval_set(spec, int(seed), ev.episodes)
    size = ev.batch_size
    k_max = model.cfg.k_max
    errs, losses = [], []
    with torch.no_grad():
        for part in batch_chunks(batch, size):
            kmask = part["kmask"]
            if not spec.anchored:  # learned slots: the mask has the training width
                kmask = torch.nn.functional.pad(kmask, (0, k_max - kmask.shape[1]))
            logits = model(part["points"].float(), part["mask"], part["init"].float(), kmask).float()
            logits = logits[..., :part["kmask"].shape[1]]
            labels, mask = part["labels"], part["mask"]
            errs.append(misclustering_rate(logits.argmax(-1), labels, mask, spec.k_pad).double())
            loss = (per_episode_permutation_cross_entropy(logits, labels, mask, part["kmask"])
                    if not spec.anchored else per_episode_cross_entropy(logits, labels, mask))
            losses.append(loss.double())
        baselines = evaluate_baselines(batch, spec, em_iters=ev.em_iters)
    err = torch.cat(errs)
    metrics = {"err": float(err.mean()), "loss": float(torch.cat(losses).mean())}
    for key in ("err_em", "err_lloyd", "err_oracle", "loss_em", "loss_oracle"):
        metrics[key] = float(baselines[key].double().mean())
    diff = err - baselines["err_em"].double()
    metrics["err_minus_em_se"] = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else math.nan
    return metrics


def held_out_test_seed(run: RunConfig) -> int:
    """The run's test seed (eval.test_seed; checkpoints made before it existed get the schema's default)."""
    return int(run.eval.test_seed)
