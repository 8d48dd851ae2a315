"""Task specs: every bad value is a ConfigError naming its key, from Python and from the config loader."""
from __future__ import annotations

from pathlib import Path

import pytest

from emformer.data.tasks import TaskSpec
from emformer.errors import ConfigError
from emformer.train.config import load_config, load_run_config

BASE = Path(__file__).resolve().parents[2] / "configs" / "base.yaml"

BAD = [
    ({"k": 1}, "task.k"),
    ({"k": 3, "n": 2}, "task.n"),
    ({"k": 2, "k_max": 5, "n": 4}, "task.n"),  # n must cover the padded k too
    ({"d": 0}, "task.d"),
    ({"separation": 0.0}, "task.separation"),
    ({"separation": -2.0}, "task.separation"),
    ({"separation": float("inf")}, "task.separation"),
    ({"separation_max": 1.0}, "task.separation_max"),
    ({"weights": "range", "weights_lo": -0.5}, "task.weights_lo"),
    ({"weights": "dirichlet", "weights_alpha": 0.0}, "task.weights_alpha"),
    ({"weights_hi": 0.1}, "task.weights_hi"),
    ({"weights": "zipf"}, "task.weights"),
    ({"noise": "laplace"}, "task.noise"),
    ({"noise": "student_t", "noise_df": 2.0}, "task.noise_df"),
    ({"init": "random"}, "task.init"),
    ({"init_noise": -0.1}, "task.init_noise"),
    ({"sigma": 0.0}, "task.sigma"),
    ({"k_max": 2}, "task.k_max"),
    ({"n_max": 10}, "task.n_max"),
    ({"d_max": 2}, "task.d_max"),
    ({"translate": -0.5}, "task.translate"),
    ({"translate": float("nan")}, "task.translate"),
    ({"translate": float("inf")}, "task.translate"),
    ({"rotate": "yes"}, "task.rotate"),
    ({"standardize": "yes"}, "task.standardize"),
    ({"rotate": True, "noise": "diagonal"}, "task.rotate"),
    ({"rotate": True, "noise": "student_t"}, "task.rotate"),
    ({"d_min": 2, "translate": 1.0}, "task.translate"),
    ({"d_min": 2, "rotate": True}, "task.rotate"),
]


@pytest.mark.parametrize("fields,key", BAD, ids=[k + "=" + str(list(f.values())[-1]) for f, k in BAD])
def test_bad_spec_names_key(fields, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        TaskSpec(**fields).validate()


@pytest.mark.parametrize("override,key", [
    ("task.k=1", "task.k"), ("task.n=2", "task.n"), ("task.d=0", "task.d"),
    ("task.separation=0", "task.separation"), ("task.separation=-3", "task.separation"),
    ("task.weights_lo=-1", "task.weights_lo"), ("task.kk=3", "task.kk"), ("task.sepration=4", "task.sepration"),
    ("task.k=three", "task.k"), ("task.translate=-1", "task.translate"), ("task.rotate=maybe", "task.rotate"),
    ("task.standardize=maybe", "task.standardize"),
])
def test_bad_override_names_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(BASE, [override])


def test_good_config_gives_valid_spec():
    spec = load_run_config(BASE, ["task.k=2", "task.n_max=64", "task.n=32"]).task
    assert (spec.k, spec.n, spec.n_pad, spec.k_pad, spec.d_pad) == (2, 32, 64, 2, spec.d)


def test_dict_round_trip_and_unknown_key():
    spec = TaskSpec(k=2, k_max=4, n=40, separation=3.0, separation_max=5.0, weights="dirichlet")
    assert TaskSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="bogus"):
        TaskSpec.from_dict({**spec.to_dict(), "bogus": 1}, where="manifest.json")


def test_padded_only_when_n_or_k_is_drawn_from_a_range() -> None:
    assert not TaskSpec(k=3, n=64).padded
    assert not TaskSpec(k=3, k_max=3, n=64, n_max=64, d=4, d_max=8).padded  # d padding masks nothing
    assert TaskSpec(k=3, n=64, n_max=128).padded
    assert TaskSpec(k=2, k_max=4, n=64).padded
