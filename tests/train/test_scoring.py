"""train/scoring.py: a ranged-n eval set scored shortest first, each chunk cut to its longest episode."""
from __future__ import annotations

import torch

from emformer.data.stream import eval_set
from emformer.data.tasks import TaskSpec
from emformer.models.config import ModelConfig
from emformer.models.transformer import ClusterTransformer, TransformerConfig
from emformer.train.scoring import score_episodes, trim_points


def test_chunks_cut_to_their_longest_episode_score_as_each_episode_alone():
    spec = TaskSpec(k=2, k_max=4, d=3, n=8, n_max=60, n_log=True, init="kmeans++").validate()
    torch.manual_seed(0)
    model = ClusterTransformer(TransformerConfig.from_task_and_model(
        spec, ModelConfig(depth=1, width=16, heads=2, passes=2, count_head=True, count_spectrum=True)))
    batch = eval_set(spec, 1_000_000_000, 40)
    together = score_episodes(model, batch, 16, count=True, every_pass=True)
    alone = score_episodes(model, batch, 1, count=True, every_pass=True)
    assert set(together) == set(alone)
    for key, value in together.items():  # rows come back in the batch's order
        torch.testing.assert_close(value.double(), alone[key].double(), atol=1e-5, rtol=0)
    part = trim_points({key: value[:5] for key, value in batch.items()})
    longest = int(batch["mask"][:5].sum(1).max())
    assert part["points"].shape[1] == part["labels"].shape[1] == part["mask"].shape[1] == longest
    assert part["init"].shape == batch["init"][:5].shape
