"""Run records: which config keys make two runs different points of a sweep."""
from __future__ import annotations

from pathlib import Path

from emformer.train.config import load_config, to_dict
from emformer.train.report.records import DONE, RunRecord

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
