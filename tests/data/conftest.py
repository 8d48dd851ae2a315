"""Fixtures of the data tests: a small task and one shard set shared by the session (kept tiny: 2 cores)."""
from __future__ import annotations

import pytest

from emformer.data.shards import write_shards
from emformer.data.tasks import TaskSpec

SHARD_EPISODES = 96
SHARD_SIZE = 12  # 8 shards: enough for 2 ranks x 2 workers, and for 4 x 2


@pytest.fixture(scope="session")
def small_spec() -> TaskSpec:
    return TaskSpec(k=3, d=4, n=32, separation=4.0)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, small_spec):
    out = tmp_path_factory.mktemp("shards") / "set"
    write_shards(small_spec, 7, out, SHARD_EPISODES, SHARD_SIZE, workers=1, progress=False)
    return out
