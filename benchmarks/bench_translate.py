"""Does a trained model know where the origin is? (why configs/reference.yaml trains with task.translate)

For each run directory given, the model of its last checkpoint labels the same fresh episodes of its task
(without augmentation) three ways: as sampled (centred between their true means), centred by the sample mean
of their points (what a user's data looks like after standardisation), and moved by task.translate = 1 (an
offset of about Δσ per coordinate). A model that learnt the origin errs more on the last two.

    python benchmarks/bench_translate.py RUN_DIR [RUN_DIR ...] [--episodes 2048]
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from emformer.data.episodes import sample_episodes
from emformer.models.metrics import misclustering_rate
from emformer.models.transformer import ClusterTransformer, TransformerConfig
from emformer.train import rundir
from emformer.train.checkpoints import load_checkpoint
from emformer.train.config import RunConfig, to_run_config

EVAL_SEED = 987_654  # apart from training (seed 0..) and the runs' own eval seeds


def _model(run_dir: Path) -> tuple[ClusterTransformer, RunConfig]:
    loaded = load_checkpoint(rundir.checkpoint_path(run_dir, "last"))
    config = to_run_config(loaded.run_config, f"{run_dir}: checkpoint config")
    model = ClusterTransformer(TransformerConfig.from_task_and_model(config.task, config.model))
    model.load_state_dict(loaded.state_dict)
    return model.eval(), config


def _err(model: ClusterTransformer, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        logits, _ = model.forward_with_centroids(batch["points"], batch["mask"], batch["init"], batch["kmask"])
    k = batch["kmask"].shape[1]
    return float(misclustering_rate(logits.argmax(-1), batch["labels"], batch["mask"], k).double().mean())


def measure(run_dir: Path, episodes: int) -> dict[str, float]:
    model, config = _model(run_dir)
    spec = dataclasses.replace(config.task, translate=0.0, rotate=False)
    raw = sample_episodes(spec, EVAL_SEED, range(episodes))
    mask = raw["mask"][..., None].float()
    mean = (raw["points"] * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
    centred = {**raw, "points": (raw["points"] - mean) * mask, "init": (raw["init"] - mean) * raw["kmask"][..., None]}
    moved = sample_episodes(dataclasses.replace(spec, translate=1.0), EVAL_SEED, range(episodes))
    return {"trained_translate": config.task.translate, "raw": _err(model, raw),
            "centred": _err(model, centred), "translated": _err(model, moved)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--episodes", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| run | task.translate | err raw | err centred by sample mean | err translated (1.0) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for run_dir in args.run_dirs:
        row = measure(run_dir, args.episodes)
        print(f"| {run_dir.name} | {row['trained_translate']} | {row['raw']:.4f} | {row['centred']:.4f} | "
              f"{row['translated']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
