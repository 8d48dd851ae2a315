"""Lightning callbacks and loggers from the config (trainer.callbacks / trainer.loggers, LightningCLI's
{class_path, init_args}): built, fed every row of the run, and a bad entry is one line naming its key."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from emformer.errors import ConfigError
from emformer.train import extensions
from tests.train.trainrun import DEBUG, rows, train

CONFIG = """defaults: {task: k2_d4, model: tiny, trainer: cpu, strategy: ddp}
name: debug
task: {n: 32}
data: {batch_size: 32}
trainer:
  max_steps: 20
  val_every: 10
  log_every: 5
  ckpt_every: 10
  callbacks:
    - class_path: lightning.pytorch.callbacks.LearningRateMonitor
      init_args: {logging_interval: step}
  loggers:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {name: csv, version: 0}
eval: {episodes: 32}
"""


@pytest.mark.slow
def test_a_debug_run_feeds_a_csv_logger_with_its_rows_and_the_lr_monitor(tmp_path):
    config = tmp_path / "debug_csv.yaml"  # outside configs/: its groups come from the package's configs
    config.write_text(CONFIG)
    run_dir = tmp_path / "run"
    train(run_dir, "trainer.progress=false", config=config)
    table = list(csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()))
    val = [r for r in table if r.get("val/loss")]
    assert [int(r["step"]) for r in val] == [r["step"] for r in rows(run_dir, "val")] == [0, 10, 20]
    for got, logged in zip(val, rows(run_dir, "val")):
        assert float(got["val/err"]) == pytest.approx(logged["err"])
    assert [int(r["step"]) for r in table if r.get("train/loss")] == [r["step"] for r in rows(run_dir, "train")]
    # LearningRateMonitor's own columns (one per parameter group), through Lightning's logger connector
    lr_columns = [key for key in table[0] if key.startswith("lr-AdamW")]
    assert lr_columns and any(r[lr_columns[0]] for r in table)


def test_a_bad_class_path_is_one_line_naming_the_key():
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import Logger

    cases = [
        ([{"class_path": "no_such_package.Monitor"}], Callback, "trainer.callbacks[0].class_path: class_path "
         "'no_such_package.Monitor': cannot import module 'no_such_package'"),
        ([{"class_path": "NoSuchMonitor"}], Callback, "module 'lightning.pytorch.callbacks' has no 'NoSuchMonitor'"),
        ([{"class_path": "lightning.pytorch.loggers.CSVLogger"}], Callback,
         "trainer.callbacks[0].class_path: lightning.pytorch.loggers.csv_logs.CSVLogger is not a "),
        ([{"class_path": "LearningRateMonitor", "init_args": {"logging_interval": "often"}}], Callback,
         "trainer.callbacks[0].init_args: LearningRateMonitor(logging_interval) refused them"),
    ]
    for specs, base, message in cases:
        key = "trainer.loggers" if base is Logger else "trainer.callbacks"
        with pytest.raises(ConfigError) as error:
            extensions.instantiate(specs, key, base)
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_a_logger_with_a_save_dir_defaults_to_the_run_directory(tmp_path):
    from lightning.pytorch.loggers import Logger

    (logger,) = extensions.instantiate([{"class_path": "CSVLogger"}], "trainer.loggers", Logger, run_dir=tmp_path)
    assert Path(logger.save_dir) == tmp_path


def test_a_bad_class_path_fails_before_the_run_dir_is_touched(tmp_path, capsys):
    from emformer.train.cli import main

    run_dir = tmp_path / "run"
    code = main(["train", str(DEBUG), "wandb.mode=disabled", "trainer.progress=false",
                 "trainer.loggers=[{class_path: lightning.pytorch.loggers.NoSuchLogger}]", "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "trainer.loggers[0].class_path" in err and "Traceback" not in err
    assert not run_dir.exists()
