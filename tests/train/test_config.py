"""The run config: where config groups are found, and what enters a run's name (its config hash)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from emformer.errors import ConfigError
from emformer.train.config import load_config, run_name

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "configs" / "debug.yaml"
LR_MONITOR = "trainer.callbacks=[{class_path: lightning.pytorch.callbacks.LearningRateMonitor}]"
CSV_LOGGER = "trainer.loggers=[{class_path: CSVLogger, init_args: {name: csv}}]"


def test_a_config_copied_out_of_configs_finds_its_groups_in_the_package(tmp_path):
    copy = Path(shutil.copy(DEBUG, tmp_path / "mine.yaml"))
    assert run_name(load_config(copy)) == run_name(load_config(DEBUG))
    assert load_config(copy, ["task=k3_d8"]).task.k == 3


def test_groups_beside_the_file_come_first(tmp_path):
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "k2_d4.yaml").write_text("k: 2\nd: 6\nseparation: 3.0\n")
    copy = Path(shutil.copy(DEBUG, tmp_path / "mine.yaml"))
    assert load_config(copy).task.d == 6


def test_a_missing_group_file_says_where_it_looked_and_why(tmp_path):
    copy = Path(shutil.copy(DEBUG, tmp_path / "mine.yaml"))
    with pytest.raises(ConfigError) as error:
        load_config(copy, ["task=k9"])
    message = str(error.value)
    assert "no config 'k9' in group 'task'" in message and "\n" not in message
    assert f"{tmp_path / 'task'} (beside the config file: no such folder)" in message
    assert f"{REPO / 'configs' / 'task'} (the package's configs: options ['k2_d4', 'k3_d8'])" in message


def test_loggers_and_monitors_keep_the_run_name_a_training_callback_does_not():
    plain = run_name(load_config(DEBUG))
    assert run_name(load_config(DEBUG, [LR_MONITOR, CSV_LOGGER])) == plain
    assert run_name(load_config(DEBUG, ["trainer.callbacks=[{class_path: LearningRateMonitor}]"])) == plain
    stopping = "trainer.callbacks=[{class_path: EarlyStopping, init_args: {monitor: val/loss}}]"
    assert run_name(load_config(DEBUG, [stopping])) != plain


@pytest.mark.parametrize("override, message", [
    ("trainer.callbacks=[{init_args: {}}]", "trainer.callbacks[0]: expected {class_path: package.Class"),
    ("trainer.loggers=[{class_path: CSVLogger, args: {}}]", "trainer.loggers[0]: unknown key(s) ['args']"),
    ("trainer.loggers=[{class_path: CSVLogger, init_args: 3}]", "trainer.loggers[0].init_args: expected a mapping"),
])
def test_a_malformed_entry_is_one_line_naming_it(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(DEBUG, [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_eval_and_test_seeds_derive_from_the_training_seed_and_pair_the_configs_of_one_seed():
    from emformer.data.config import HELD_OUT_SEEDS

    seeds = {}
    for data_seed in (0, 1, 7):
        for depth in (1, 4):
            ev = load_config(DEBUG, [f"data.seed={data_seed}", f"model.depth={depth}"]).eval
            seeds.setdefault(data_seed, set()).add((ev.seed, ev.test_seed))
    assert all(len(pairs) == 1 for pairs in seeds.values())  # same eval set for every config of a seed
    every = [s for pairs in seeds.values() for pair in pairs for s in pair]
    assert len(set(every)) == len(every) and min(every) >= HELD_OUT_SEEDS  # disjoint, above all training seeds
    explicit = load_config(DEBUG, ["eval.seed=1000000100"]).eval
    assert explicit.seed == 1_000_000_100 and explicit.test_seed == 1_000_000_001
    assert run_name(load_config(DEBUG, ["data.seed=1"])) != run_name(load_config(DEBUG))


def test_iteration_and_bucket_keys_keep_the_run_name_at_their_defaults():
    """model.passes / passes_min / tied / grad_passes, data.buckets and the mixed noise's shares came after
    published runs: at their defaults they
    leave every name as it was; any other value is another run."""
    from emformer.train.config import hashed_values

    plain = run_name(load_config(DEBUG))
    defaults = ["model.passes=1", "model.passes_min=null", "model.tied=false", "model.grad_passes=null",
                "data.buckets=0", "task.diagonal_share=0.25", "task.student_t_share=0.25"]
    assert run_name(load_config(DEBUG, defaults)) == plain
    values = hashed_values(load_config(DEBUG))
    assert not {"passes", "passes_min", "tied", "grad_passes"} & set(values["model"]) and "buckets" not in values["data"]
    assert not {"diagonal_share", "student_t_share"} & set(values["task"])
    others = ["model.passes=3", "model.passes=3 model.passes_min=1", "model.tied=true",
              "model.passes=3 model.grad_passes=1", "task.n_max=64 data.buckets=2", "task.noise=mixed",
              "task.noise=mixed task.student_t_share=0.5"]
    names = {run_name(load_config(DEBUG, other.split())) for other in others}
    assert len(names) == len(others) and plain not in names


@pytest.mark.parametrize("source", ["pool", "shards"])
def test_mixed_noise_trains_on_fresh_episodes_only(source, tmp_path):
    from emformer.train.config import validate

    with pytest.raises(ConfigError, match="data.source: expected fresh with task.noise=mixed"):
        validate(load_config(DEBUG, ["task.noise=mixed", f"data.source={source}", f"data.shards_dir={tmp_path}",
                                     "data.pool_size=64"]))
