"""Run records: which config keys make two runs different points of a sweep."""
from __future__ import annotations

from pathlib import Path

from emformer.train.config import load_config, to_dict
from emformer.train.report.checks import Point, varying_keys
from emformer.train.report.records import DONE, RunRecord, point_values

DEBUG = Path(__file__).resolve().parents[3] / "configs" / "debug.yaml"


def record(*overrides: str) -> RunRecord:
    return RunRecord(Path("run"), DONE, config=to_dict(load_config(DEBUG, list(overrides))))


def test_loggers_and_monitors_keep_a_run_in_its_point_a_training_callback_does_not():
    plain = record().point_key()
    observed = record("trainer.callbacks=[{class_path: LearningRateMonitor}]",
                      "trainer.loggers=[{class_path: CSVLogger, init_args: {name: csv}}]")
    assert observed.point_key() == plain
    stopping = record("trainer.callbacks=[{class_path: EarlyStopping, init_args: {monitor: val/loss}}]")
    assert stopping.point_key() != plain
    assert "EarlyStopping" in dict(stopping.point_key())["trainer.callbacks"]


def test_a_run_made_before_a_key_joined_the_config_is_at_its_neutral_value():
    """A committed run's config.yaml lacks the keys added since (model.passes, data.buckets, ...): it ran at
    their neutral value, so it is one point with a new run at that value, and only a changed value varies."""
    new = record()
    old = RunRecord(Path("old"), DONE, config=to_dict(load_config(DEBUG)))
    for section, key in (("model", "passes"), ("model", "tied"), ("data", "buckets"), ("task", "diagonal_share")):
        del old.config[section][key]
    assert old.point_key() == new.point_key()
    values = point_values(old)
    assert values["model.passes"] == 1 and values["data.buckets"] == 0
    looped = record("model.passes=4")
    assert varying_keys([Point(point_values(r), [r]) for r in (old, new, looped)]) == ["model.passes"]
