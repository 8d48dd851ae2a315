"""data/config.py: the data section and the held-out seed range."""
from __future__ import annotations

import pytest

from emformer.data.config import HELD_OUT_SEEDS, DataConfig, held_out_seeds
from emformer.errors import ConfigError


def test_held_out_seeds_are_one_to_one_and_above_every_training_seed():
    pairs = [held_out_seeds(s) for s in (0, 1, 2, 10**6, HELD_OUT_SEEDS - 1)]
    every = [s for pair in pairs for s in pair]
    assert len(set(every)) == len(every) and min(every) >= HELD_OUT_SEEDS
    assert held_out_seeds(3) == (HELD_OUT_SEEDS + 6, HELD_OUT_SEEDS + 7)
    with pytest.raises(ValueError, match="training seed must be in"):
        held_out_seeds(HELD_OUT_SEEDS)


def test_a_training_seed_in_the_held_out_range_is_refused():
    with pytest.raises(ConfigError, match=r"data.seed: expected an integer in \[0, 1_000_000_000\)"):
        DataConfig(seed=HELD_OUT_SEEDS).validate()
