"""What length buckets (data.buckets) save: the training step of a tiny model on n in [32, 1024].

Task k in [2, 8], d = 8, n log-uniform in [32, 1024], k-means++ init, batch 32; model depth 2, heads 2,
width 32. The same number of fresh batches with data.buckets = 0 (every episode padded to 1024), 4 and 8;
batches are drawn before the clock starts, so the figures are the step (forward, backward, AdamW) alone, per
step and per real point (bucketed runs draw other episodes, so their real points differ a little).

    python benchmarks/bench_buckets.py [--steps 40] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch

from emformer.data.stream import EpisodeStream
from emformer.data.tasks import TaskSpec
from emformer.models.config import ModelConfig
from emformer.models.losses import iterated_loss
from emformer.models.transformer import ClusterTransformer, TransformerConfig

SPEC = TaskSpec(k=2, k_max=8, d=8, n=32, n_max=1024, n_log=True, init="kmeans++")
MODEL = ModelConfig(depth=2, heads=2, width=32)


def step_cost(buckets: int, steps: int) -> dict[str, float]:
    """Mean seconds a step, and real points and padded point slots a batch, over `steps` batches."""
    torch.manual_seed(0)
    model = ClusterTransformer(TransformerConfig.from_task_and_model(SPEC.validate(), MODEL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stream = EpisodeStream(SPEC, seed=0, batch_size=32, buckets=buckets)
    batches = [stream.batch(g) for g in range(steps + 1)]

    def step(batch: dict[str, torch.Tensor]) -> None:
        optimizer.zero_grad()
        outputs = model.forward_passes(batch["points"], batch["mask"], batch["init"], batch["kmask"])
        iterated_loss(outputs, batch, True).backward()
        optimizer.step()

    step(batches[0])  # warm-up, not timed
    started = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    seconds = (time.perf_counter() - started) / steps
    real = sum(int(b["mask"].sum()) for b in batches[1:]) / steps
    slots = sum(b["mask"].numel() for b in batches[1:]) / steps
    return {"step_s": seconds, "points": real, "slots": slots}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| data.buckets | ms / step | µs / real point | real points / batch | padded slots / batch |")
    print("| --- | --- | --- | --- | --- |")
    for buckets in (0, 4, 8):
        row = step_cost(buckets, args.steps)
        print(f"| {buckets} | {row['step_s'] * 1e3:.0f} | {row['step_s'] * 1e6 / row['points']:.1f} | "
              f"{row['points']:.0f} | {row['slots']:.0f} |")


if __name__ == "__main__":
    main()
