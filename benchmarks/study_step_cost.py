"""CPU time (time.process_time, 1 thread) of one training step of each model of configs/sweeps/study.yaml,
which sizes its runs from these: sample 64 episodes (k=2, d=4, n=64), forward, loss, backward, AdamW step.

CPU time rather than wall time: on a shared machine wall time measures the other jobs. Run from the
repository root: `python benchmarks/study_step_cost.py`.
"""
from __future__ import annotations

import time

import torch

from emformer.data.episodes import sample_episodes
from emformer.models.losses import clustering_loss
from emformer.models.transformer import ClusterTransformer, TransformerConfig
from emformer.train.config import load_run_config
from emformer.train.scoring import model_inputs

SHAPES = ((1, 2), (2, 2), (4, 2), (8, 2), (2, 1), (2, 4), (2, 8))
"""(depth L, heads M) of the study's runs"""
WARMUP, STEPS = 3, 15


def step_cost_ms(depth: int, heads: int) -> float:
    run = load_run_config("configs/debug.yaml", ["task.n=64", f"model.depth={depth}", f"model.heads={heads}"])
    model = ClusterTransformer(TransformerConfig.from_task_and_model(run.task, run.model))
    spec = run.task
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = 0.0
    for i in range(WARMUP + STEPS):
        if i == WARMUP:
            start = time.process_time()
        batch = sample_episodes(spec, 0, range(i * 64, (i + 1) * 64))
        logits, centroids = model.forward_with_centroids(*model_inputs(batch))
        loss = clustering_loss(logits, batch, True, centroids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return 1000 * (time.process_time() - start) / STEPS


if __name__ == "__main__":
    torch.set_num_threads(1)
    for depth, heads in SHAPES:
        print(f"L={depth} M={heads}: {step_cost_ms(depth, heads):.0f} ms CPU per step", flush=True)
