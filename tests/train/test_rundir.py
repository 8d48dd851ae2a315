"""train/rundir.py: the run and sweep directory's files, each read and written in one place."""
from __future__ import annotations

import json

import pytest

from emformer.errors import ConfigError
from emformer.train import rundir


def test_metrics_log_round_trip_writes_nan_as_null_and_truncates_on_resume(tmp_path):
    log = rundir.MetricsLog(tmp_path)
    for step in (0, 10, 20):
        log.append({"step": step, "split": "train", "loss": float("nan") if step == 10 else 1.0 / (step + 1)})
    log.close()
    rows = rundir.read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 10, 20] and rows[1]["loss"] is None
    assert log.truncate_after(10) == 1
    assert [r["step"] for r in rundir.read_metrics(tmp_path)] == [0, 10]


def test_tolerant_read_skips_a_torn_last_line_and_a_missing_file_is_no_rows(tmp_path):
    assert rundir.read_metrics(tmp_path / "never-started") == []
    path = rundir.metrics_path(tmp_path)
    path.write_text('{"step": 0, "split": "train"}\n{"step": 5, "split": "va')
    assert rundir.read_metrics(tmp_path) == [{"step": 0, "split": "train"}]


def test_checked_read_names_file_and_line_and_tolerates_a_write_in_progress(tmp_path):
    path = rundir.metrics_path(tmp_path)
    path.write_text('{"step": 0, "split": "train"}\nnot json\n{"step": "x", "split": "val"}\n'
                    '{"split": "val"}\n{"step": 10, "split": "val", "err": 0.2}\n{"step": 20, "split": "va')
    train, val, problems = rundir.read_metrics_checked(tmp_path, finished=False)
    assert [r["step"] for r in train] == [0] and [r["step"] for r in val] == [10]
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    # The same torn last line in a finished run is corruption.
    _, _, problems = rundir.read_metrics_checked(tmp_path, finished=True)
    assert problems[-1].startswith(f"{path}:6: not valid JSON")


def test_config_done_and_meta(tmp_path):
    assert not rundir.has_config(tmp_path) and not rundir.is_done(tmp_path)
    rundir.write_config(tmp_path, {"trainer": {"max_steps": 3}})
    assert rundir.read_config(tmp_path) == {"trainer": {"max_steps": 3}}
    rundir.config_path(tmp_path).write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"config.yaml: unreadable config: expected a mapping"):
        rundir.read_config(tmp_path)
    assert rundir.read_done(tmp_path) == {} and rundir.read_meta(tmp_path) == {}
    rundir.write_done(tmp_path, {"step": 3, "val": {"err": 0.1}})
    rundir.write_meta(tmp_path, {"param_count": 7})
    assert rundir.is_done(tmp_path) and rundir.read_done(tmp_path)["val"] == {"err": 0.1}
    assert rundir.read_meta(tmp_path) == {"param_count": 7}
    rundir.done_path(tmp_path).write_text("{torn")
    assert rundir.is_done(tmp_path) and rundir.read_done(tmp_path) == {}


def test_checkpoint_paths_prefer_best_and_refuse_an_unknown_choice(tmp_path):
    assert rundir.best_or_last_checkpoint(tmp_path) is None and rundir.checkpoints_present(tmp_path) == []
    rundir.checkpoint_dir(tmp_path).mkdir()
    rundir.checkpoint_path(tmp_path, "last").write_bytes(b"")
    assert rundir.best_or_last_checkpoint(tmp_path).name == "last.ckpt"
    rundir.checkpoint_path(tmp_path, "best").write_bytes(b"")
    assert rundir.best_or_last_checkpoint(tmp_path).name == "best.ckpt"
    assert rundir.checkpoints_present(tmp_path) == ["best.ckpt", "last.ckpt"]
    assert rundir.looks_like_run_dir(tmp_path)
    with pytest.raises(ConfigError, match="which: expected 'best' or 'last'"):
        rundir.checkpoint_path(tmp_path, "first")


def test_index_strict_and_lenient_reads(tmp_path):
    rundir.write_index(tmp_path, "s", [{"id": 0, "name": "a", "run_dir": "runs/a", "overrides": {}, "seed": 0}])
    assert rundir.read_index(tmp_path)[0]["name"] == "a"
    assert rundir.index_run_dirs(tmp_path) == ([tmp_path / "runs" / "a"], [])
    rundir.index_path(tmp_path).write_text(json.dumps({"runs": {"b": {}}}))  # another shape of index
    assert rundir.index_run_dirs(tmp_path) == ([tmp_path / "runs" / "b"], [])
    with pytest.raises(ConfigError, match=r"index.json: not a sweep index"):
        rundir.read_index(tmp_path)
    rundir.index_path(tmp_path).write_text("{")
    dirs, problems = rundir.index_run_dirs(tmp_path)
    assert dirs == [] and problems[0].startswith(f"{rundir.index_path(tmp_path)}: unreadable index")


def test_run_dirs_on_disk_and_launch_records(tmp_path):
    for name in ("runs/a", "runs/b/wandb/x", "runs/.hidden"):
        (tmp_path / name).mkdir(parents=True)
        rundir.config_path(tmp_path / name).write_text("{}\n")
    assert rundir.run_dirs_on_disk(tmp_path) == [tmp_path / "runs" / "a"]
    assert rundir.read_launch_record(tmp_path, 3) is None
    rundir.write_launch_record(tmp_path, 3, {"pid": 1})
    assert rundir.read_launch_record(tmp_path, 3) == {"pid": 1}
    assert rundir.launch_record_path(tmp_path, 3) == tmp_path / "local" / "3.json"


def test_episode_results_round_trip_as_error_counts_and_a_damaged_file_is_named(tmp_path):
    import numpy as np

    points = np.array([64, 64, 30])
    figures = {"points": points, "k": np.array([2, 3, 2]), "err_model": np.array([3, 0, 7]) / points,
               "loss_model": np.array([0.25, 0.125, 1.5]), "err_em": np.array([1, 2, 30]) / points}
    rundir.write_episode_results(tmp_path, figures, step=40, eval_seed=1_000_000_002)
    back = rundir.read_episode_results(tmp_path)
    assert back["step"] == 40 and back["eval_seed"] == 1_000_000_002
    assert np.array_equal(back["err_model"], figures["err_model"]) and np.array_equal(back["k"], [2, 3, 2])
    assert np.allclose(back["loss_model"], figures["loss_model"]) and back["err_em"][2] == 1.0
    assert rundir.read_episode_results(tmp_path / "none") is None
    rundir.episodes_path(tmp_path).write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="episodes.npz: not a readable episode file"):
        rundir.read_episode_results(tmp_path)


def test_per_pass_errors_round_trip_as_two_dimensional_counts(tmp_path):
    """A model trained to iterate keeps err after each pass and EM's after each iteration, [E, T]."""
    import numpy as np

    points = np.array([64, 30, 40])
    per_pass = np.array([[9, 5, 3], [30, 2, 0], [4, 4, 4]]) / points[:, None]
    figures = {"points": points, "k": np.array([2, 3, 2]), "err_model": per_pass[:, -1],
               "err_pass": per_pass, "err_em_iter": np.array([[8, 6, 5], [3, 3, 1], [0, 0, 0]]) / points[:, None]}
    rundir.write_episode_results(tmp_path, figures, step=8, eval_seed=1_000_000_000)
    with np.load(rundir.episodes_path(tmp_path)) as raw:
        assert raw["errors_pass"].shape == (3, 3) and raw["errors_pass"].dtype == np.uint16
        assert raw["errors_pass"][1].tolist() == [30, 2, 0]
    back = rundir.read_episode_results(tmp_path)
    assert np.array_equal(back["err_pass"], per_pass) and np.array_equal(back["err_em_iter"], figures["err_em_iter"])
    assert np.array_equal(back["err_model"], per_pass[:, -1]) and back["err_model"].shape == (3,)
