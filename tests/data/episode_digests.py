"""Digests of everything the sampler makes, for the cross-CPU test: run as a script under a math-library
setting, it prints them as JSON (`python tests/data/episode_digests.py THREADS`).

Every sampler mode appears in `SPECS` at least once; each digest covers every key of a batch of scattered
indices (one stream seek each) and of a consecutive run (one stream read), and the shard bytes and a run's
eval set go through the same code the training stream uses.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

SPECS = {
    "reference": dict(k=3, d=8, n=256),
    "ranged": dict(k=2, k_max=5, d=4, d_max=6, n=20, n_max=60, separation=2.0, separation_max=5.0),
    "log_n_weights": dict(k=3, d=2, n=8, n_max=300, n_log=True, weights="range"),
    "modes": dict(k=4, d=3, n=50, weights="dirichlet", weights_alpha=0.7, noise="student_t", noise_df=5.0),
    "moved": dict(k=3, d=5, d_min=2, n=30, noise="diagonal", init="kmeans++", standardize=True),
    "rotated": dict(k=3, d=3, n=20, translate=2.0, rotate=True, init="none"),
    "rotated_wide": dict(k=2, d=12, n=24, rotate=True, init="kmeans++"),
    "spectral": dict(k=3, k_max=4, d=4, n=40, init="spectral"),
    "many_k": dict(k=8, d=6, n=64, init="kmeans++", standardize=True),
}
SCATTERED = [5, 1023, 1024, 2**40]
SEED = 11
DEBUG_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"


def batch_digest(batch: dict[str, torch.Tensor]) -> str:
    from emformer.data.episodes import EPISODE_KEYS

    digest = hashlib.sha256()
    for key in EPISODE_KEYS:
        digest.update(key.encode())
        digest.update(batch[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


def digests() -> dict[str, str]:
    from emformer.data.episodes import sample_episodes
    from emformer.data.shards import shard_bytes
    from emformer.data.stream import eval_set
    from emformer.data.tasks import TaskSpec
    from emformer.train.config import load_run_config

    out = {}
    for name, fields in SPECS.items():
        spec = TaskSpec(**fields).validate()
        out[name] = batch_digest(sample_episodes(spec, SEED, SCATTERED))
        out[name + "/run"] = batch_digest(sample_episodes(spec, SEED, range(60, 100)))
    out["shard"] = hashlib.sha256(shard_bytes(TaskSpec(**SPECS["ranged"]), 7, 0, 9)).hexdigest()
    cfg = load_run_config(DEBUG_CONFIG)
    out["debug_eval_set"] = batch_digest(eval_set(cfg.task, cfg.eval.seed, cfg.eval.episodes))
    return out


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print(json.dumps(digests(), sort_keys=True))
