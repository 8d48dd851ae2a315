"""`emformer train` end to end on CPU: it learns, the run directory, re-run, kill-and-resume, SIGUSR1, wandb,
and bad input (clear one-line errors, nothing written or overwritten).

The debug config's 200-step run is trained once per module and shared: it is the uninterrupted reference
of the crash and the preemption tests, which must end with the same metrics to floating-point tolerance.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train.trainrun import (REPO, assert_same_rows, computed, env, no_duplicate_steps, rows, train,
                                  train_command)

TRAIN_KEYS = {"step", "split", "loss", "lr", "episodes_per_s", "tokens_per_s"}
VAL_KEYS = {"step", "split", "loss", "err", "err_anchored", "ari", "train_loss", "train_err", "err_em",
            "err_em_anchored", "loss_em", "err_lloyd", "err_oracle", "err_oracle_anchored", "loss_oracle",
            "err_em_depth", "err_em_depth_anchored", "err_init"}


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The shipped debug config exactly (200 steps), with its console progress bar."""
    run_dir = tmp_path_factory.mktemp("debug") / "run"
    return run_dir, train(run_dir)


@pytest.mark.slow
def test_debug_config_learns(debug_run):
    run_dir, _ = debug_run
    train_rows, val_rows = rows(run_dir, "train"), rows(run_dir, "val")
    first, last = val_rows[0], val_rows[-1]
    assert first["step"] == 0 and last["step"] == 200
    assert train_rows[-1]["loss"] < 0.5 * train_rows[0]["loss"]
    assert last["loss"] < 0.5 * first["loss"]
    # Better than the initial centroids it was handed, and far better than the untrained model.
    assert last["err_anchored"] < last["err_init"]
    assert last["err"] < 0.5 * first["err"]
    assert last["err_oracle"] <= last["err"]


@pytest.mark.slow
def test_run_directory_contents(debug_run):
    run_dir, result = debug_run
    from emformer.train.config import load_config, to_dict

    saved = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())))
    expected = to_dict(load_config(REPO / "configs" / "debug.yaml", ["trainer.threads=1", "wandb.mode=disabled"]))
    assert saved == expected

    meta = json.loads((run_dir / "meta.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert meta["git_commit"] == head.stdout.strip()
    assert meta["param_count"] == 27_744 and meta["devices"] == 1 and meta["precision"] == "32"
    assert meta["versions"]["torch"] == torch.__version__ and len(meta["starts"]) == 1

    train_rows, val_rows = rows(run_dir, "train"), rows(run_dir, "val")
    assert [r["step"] for r in train_rows] == list(range(10, 201, 10))
    assert [r["step"] for r in val_rows] == [0, 50, 100, 150, 200]
    assert all(TRAIN_KEYS <= r.keys() and r["episodes_per_s"] > 0 and r["lr"] > 0 for r in train_rows)
    assert all(VAL_KEYS <= r.keys() for r in val_rows)
    no_duplicate_steps(run_dir)

    done = json.loads((run_dir / "DONE").read_text())
    assert done["step"] == 200 and done["val"] == val_rows[-1]
    # The final evaluation per episode: its means are the final row's figures, on the seed's own eval set.
    from emformer.train.rundir import read_episode_results

    episodes = read_episode_results(run_dir)
    assert episodes["step"] == 200 and episodes["eval_seed"] == saved["eval"]["seed"] == 1_000_000_000
    assert len(episodes["err_model"]) == saved["eval"]["episodes"]
    for method, key in [("model", "err"), ("model", "loss"), ("em", "err_em"), ("em", "loss_em"),
                        ("lloyd", "err_lloyd"), ("oracle", "err_oracle"), ("oracle", "loss_oracle"),
                        ("init", "err_init"), ("init", "loss_init")]:
        name = f"{key.split('_')[0]}_{method}"
        assert episodes[name].mean() == pytest.approx(done["val"][key], rel=1e-6), name

    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 200 and 0 < best["global_step"] <= 200
    assert last["hyper_parameters"]["config"] == saved
    assert last["state_dict"] and all(key.startswith("model.") for key in last["state_dict"])
    best_row = min((r for r in val_rows if r["step"] > 0), key=lambda r: r["loss"])
    assert best["global_step"] == best_row["step"]
    assert not list((run_dir / "checkpoints").glob(".*"))  # no temporary files left behind

    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # wandb.mode=disabled writes nothing of wandb's.
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb_id").exists()
    # The console progress bar (tqdm, on stderr) and the summary line.
    assert "train:" in result.stderr and "200/200" in result.stderr and "step/s" in result.stderr
    assert "done at step 200" in result.stderr


@pytest.mark.slow
def test_rerun_of_a_finished_run_does_nothing(debug_run):
    run_dir, _ = debug_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    result = train(run_dir)
    assert "finished (DONE); nothing to do" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(debug_run, tmp_path):
    """Killed after step 130 (last checkpoint at 100), then re-run: the same metrics as without the kill."""
    reference, _ = debug_run
    run_dir = tmp_path / "run"
    crashed = train(run_dir, extra_env={"EMFORMER_CRASH_AT_STEP": "130"}, expect=1)
    assert not (run_dir / "DONE").exists()
    assert rows(run_dir)[-1]["step"] == 130  # rows after the checkpoint were written ...
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 100
    del crashed
    resumed = train(run_dir)
    assert "resuming from step 100" in resumed.stderr
    no_duplicate_steps(run_dir)  # ... and were dropped on resume, then written again
    assert_same_rows(rows(run_dir), rows(reference))
    assert json.loads((run_dir / "DONE").read_text())["val"]["loss"] == pytest.approx(
        json.loads((reference / "DONE").read_text())["val"]["loss"], rel=1e-6)
    starts = json.loads((run_dir / "meta.json").read_text())["starts"]
    assert [s["step"] for s in starts] == [0, 100]


@pytest.mark.slow
def test_sigusr1_saves_last_and_exits_without_done_then_resumes_exactly(debug_run, tmp_path):
    """The preemption path outside SLURM: checkpoint at whatever step the signal lands, exit 0, no DONE,
    requeue skipped (and said so); the re-run resumes mid-window and ends where the uninterrupted run did."""
    reference, _ = debug_run
    run_dir = tmp_path / "run"
    process = subprocess.Popen(train_command(run_dir, "trainer.progress=false"), cwd=REPO, env=env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file() and any(r["split"] == "train" for r in rows(run_dir)):
                break
            time.sleep(0.1)
        assert process.poll() is None, "training ended before the signal could be sent"
        process.send_signal(signal.SIGUSR1)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert not (run_dir / "DONE").exists()
    assert "requeue skipped" in stderr
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert 10 <= step < 200 and f"preempted at step {step}" in stderr
    assert rows(run_dir)[-1]["step"] <= step

    resumed = train(run_dir)
    assert f"resuming from step {step}" in resumed.stderr
    no_duplicate_steps(run_dir)
    assert_same_rows(rows(run_dir), rows(reference))


WANDB_OVERRIDES = ("wandb.mode=offline", "trainer.max_steps=20", "trainer.val_every=10", "trainer.ckpt_every=10",
                   "trainer.log_every=5", "eval.episodes=64", "trainer.progress=false", "wandb.group=tests",
                   "wandb.tags=[ci]")


@pytest.mark.slow
def test_a_run_under_another_cpus_math_paths_trains_on_the_same_episodes(tmp_path):
    """MKL's AVX2 branch and ATen's AVX2 kernels (what an AMD node or an older Intel one takes): the episodes
    and the eval set are the same bits (tests/data/test_cross_cpu.py), so a run differs only by the model's
    own float math (MKL/oneDNN kernels), at rounding level; the same settings give the same bytes."""
    short = ("trainer.max_steps=40", "trainer.val_every=20", "trainer.ckpt_every=40")
    here, other, again = (tmp_path / name for name in ("here", "other", "again"))
    train(here, *short)
    train(other, *short, extra_env={"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"})
    train(again, *short)
    assert_same_rows(rows(other), rows(here), rel=1e-5, abs_=1e-4)  # 1e-4: one point in 32,768 may flip
    assert [computed(r) for r in rows(again)] == [computed(r) for r in rows(here)]


@pytest.mark.slow
def test_wandb_offline_run_is_recognised_and_resumes_the_same_id(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, *WANDB_OVERRIDES, extra_env={"EMFORMER_CRASH_AT_STEP": "10", "WANDB_MODE": None}, expect=1)
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert len(run_id) >= 8
    train(run_dir, *WANDB_OVERRIDES, extra_env={"WANDB_MODE": None})
    assert (run_dir / "wandb_id").read_text().strip() == run_id
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline)
    for folder in offline:
        assert (folder / f"run-{run_id}.wandb").stat().st_size > 0
    assert list((offline[-1] / "files" / "media" / "images").glob("curves_*.png"))  # the curves plot, at the end
    # wandb's own tool sees both segments as one unsynced run to upload (nothing is uploaded).
    result = subprocess.run([str(Path(sys.executable).with_name("wandb")), "sync", "--dry-run", *map(str, offline)],
                            cwd=tmp_path, env=env(WANDB_MODE=None), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "Would sync 2 run(s)" in output and all(f"{p.name}/run-{run_id}.wandb" in output for p in offline)


# ---------------------------------------------------------------------------------------------- bad input
DEBUG = REPO / "configs" / "debug.yaml"


def run_cli(run_dir: Path, *overrides: str) -> int:
    from emformer.train.cli import main

    return main(["train", str(DEBUG), "wandb.mode=disabled", "trainer.progress=false", *overrides,
                 "--run-dir", str(run_dir)])


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("overrides, message", [
    (["model.depht=3"], "unknown key 'model.depht'"),
    (["trainer.max_steps=many"], "trainer.max_steps"),
    (["model.width=30", "model.heads=4"], "model.width: expected a positive multiple of model.heads (4)"),
    (["strategy=zero9"], "no config 'zero9' in group 'strategy'"),
    (["eval.seed=0"], "eval.seed: expected a seed >= 1_000_000_000 (above every training seed"),
    (["eval.test_seed=1000000000"], "eval.test_seed: expected a seed different from eval.seed (1000000000)"),
    (["data.seed=1000000000"], "data.seed: expected an integer in [0, 1_000_000_000)"),
    (["trainer.devices=4096"], "trainer.devices: 4096 requested but this machine has"),
    (["trainer.precision=16-mixed", "trainer.accelerator=cpu"], "trainer.precision: 16-mixed is for GPUs"),
    (["data.source=shards"], "data.shards_dir: expected a directory"),
    (["model.centroid_head=true", "task.init=none"], "model.centroid_head: expected false when task.init is none"),
])
def test_config_errors_are_one_line_and_write_nothing(tmp_path, capsys, overrides, message):
    run_dir = tmp_path / "run"
    assert run_cli(run_dir, *overrides) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("emformer train: error:") and "Traceback" not in err
    assert not run_dir.exists()


def test_shards_that_disagree_with_the_config_are_refused_before_anything_is_written(tmp_path, capsys):
    from emformer.data.shards import write_shards
    from emformer.data.tasks import TaskSpec

    shards = tmp_path / "shards"
    write_shards(TaskSpec(k=2, d=4, n=16, separation=3.0), 0, shards, episodes=8, shard_size=4, progress=False)
    run_dir = tmp_path / "run"
    assert run_cli(run_dir, "data.source=shards", f"data.shards_dir={shards}") == 2
    err = capsys.readouterr().err
    assert "shards were generated for another task" in err and "n:" in err
    assert not run_dir.exists()


@pytest.mark.parametrize("key, seed", [("eval.seed", 1_000_000_000), ("eval.test_seed", 1_000_000_001)])
def test_shards_made_with_a_held_out_seed_are_refused(tmp_path, capsys, key, seed):
    """Shards generated with the eval (or test) seed hold the very episodes the run is scored on."""
    from emformer.data.shards import write_shards
    from emformer.train.config import load_run_config

    shards = tmp_path / "shards"
    write_shards(load_run_config(DEBUG, []).task, seed, shards, episodes=8, shard_size=4, progress=False)
    run_dir = tmp_path / "run"
    assert run_cli(run_dir, "data.source=shards", f"data.shards_dir={shards}", f"{key}={seed}") == 2
    err = capsys.readouterr().err
    assert f"generated with seed {seed}, which is {key}" in err and "Traceback" not in err
    assert not run_dir.exists()


def test_incompatible_checkpoint_is_refused_and_kept(tmp_path, capsys):
    from export_fixtures import make_fake_run

    run_dir = make_fake_run(tmp_path / "run")
    (run_dir / "config.yaml").unlink()  # as if only the checkpoint had been copied in
    before = snapshot(run_dir)
    assert run_cli(run_dir, "model.width=16") == 2
    err = capsys.readouterr().err
    assert "last.ckpt: tensor 'model." in err and "different model shape" in err
    assert snapshot(run_dir) == before


def test_a_run_dir_of_another_config_is_refused_even_when_finished(tmp_path, capsys):
    from export_fixtures import make_fake_run

    run_dir = make_fake_run(tmp_path / "run")
    (run_dir / "DONE").write_text("{}")
    before = snapshot(run_dir)
    assert run_cli(run_dir, "model.depth=3") == 2
    err = capsys.readouterr().err
    assert "holds a run of a different config" in err and len(err.strip().splitlines()) == 1
    assert snapshot(run_dir) == before


def test_a_changed_config_names_the_keys_that_differ():
    from emformer.train.config import differing_keys, load_config

    old = load_config(DEBUG)
    assert differing_keys(old, load_config(DEBUG)) == []
    assert differing_keys(old, load_config(DEBUG, ["model.depth=3", "optim.lr=0.01", "wandb.mode=disabled",
                                                   "trainer.threads=1"])) == [
        "model.depth: 2 -> 3", "optim.lr: 0.003 -> 0.01"]  # wandb and threads do not change what a run computes


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys, damage):
    from export_fixtures import make_fake_run

    run_dir = make_fake_run(tmp_path / "run")
    (run_dir / "config.yaml").unlink()
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(b"not a checkpoint at all" if damage == "garbage" else last.read_bytes()[:2000])
    before = snapshot(run_dir)
    assert run_cli(run_dir) == 2
    err = capsys.readouterr().err
    assert "last.ckpt: corrupt or unreadable checkpoint" in err
    assert snapshot(run_dir) == before


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """A learning rate of 1e5 diverges within a few steps; checkpoints every step until then."""
    run_dir = tmp_path / "run"
    code = run_cli(run_dir, *DIVERGING, "trainer.ckpt_every=1")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "NaN or infinite" in err and "try a lower optim.lr" in err and "Traceback" not in err
    assert not (run_dir / "DONE").exists()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert 1 <= ckpt["global_step"] < 50
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    logged = [r["step"] for r in rows(run_dir, "train")]
    assert logged and max(logged) <= ckpt["global_step"] + 1


def test_nan_loss_before_any_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_cli(run_dir, *DIVERGING, "trainer.ckpt_every=100") == 2
    err = capsys.readouterr().err
    assert "training loss is nan" in err and "no checkpoint was written" in err
    assert not (run_dir / "DONE").exists() and not (run_dir / "checkpoints").exists()


def test_nan_between_train_rows_never_reaches_a_checkpoint(tmp_path, capsys):
    """Losses are only looked at on the host at check points (here: checkpoints every 3 steps, rows every 25):
    the divergence is caught at the first check point after it, before that checkpoint is written."""
    run_dir = tmp_path / "run"
    code = run_cli(run_dir, *DIVERGING, "trainer.log_every=25", "trainer.ckpt_every=3")
    err = capsys.readouterr().err
    assert code == 2, err
    match = re.search(r"training loss is nan or infinite from step (\d+) \(found at step (\d+)\)", err)
    assert match and "Traceback" not in err, err
    first, found = int(match[1]), int(match[2])
    assert found % 3 == 0 and found - 3 < first <= found
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] < first
        assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


def test_the_host_looks_at_the_loss_only_at_check_points(tmp_path, monkeypatch):
    """No host sync or collective in an ordinary step: values reach the host at train rows (every 4), val rows
    (every 6), checkpoints (every 9) and the last step, once per parameter check on save."""
    from emformer.train.callbacks import RunControl

    calls = []
    real = RunControl._agree_values
    monkeypatch.setattr(RunControl, "_agree_values",
                        lambda self, trainer, *values: calls.append(trainer.global_step) or real(self, trainer, *values))
    assert run_cli(tmp_path / "run", "trainer.max_steps=20", "trainer.log_every=4", "trainer.val_every=6",
                   "trainer.ckpt_every=9", "eval.episodes=16") == 0
    check_points = sorted({s for s in range(1, 21) if s % 4 == 0 or s % 6 == 0 or s % 9 == 0} | {20})
    saves = [9, 18, 20]  # `last`; plus `best` on improvement at val rows (counted below)
    assert set(calls) == set(check_points)
    assert len(calls) >= len(check_points) + len(saves)
    assert all(calls.count(s) == 1 for s in check_points if s not in saves and s % 6)


DIVERGING = ("optim.lr=1e5", "optim.warmup_steps=0", "trainer.max_steps=50", "trainer.log_every=1",
             "trainer.val_every=100", "eval.episodes=16")


def test_oversubscribed_threads_get_a_one_line_hint():
    from emformer.train.fit import oversubscription_hint

    assert oversubscription_hint(1, 1, 2, 0.9) is None
    assert oversubscription_hint(2, 1, 4, 1.0) is None
    hint = oversubscription_hint(2, 1, 2, 1.3)  # a busy 2-core laptop with torch's default of 2 threads
    assert hint is not None and "\n" not in hint
    assert hint.startswith("2 thread(s) x 1 process(es) exceed the ~1 free core(s)") and "trainer.threads=1" in hint
    assert "trainer.threads=2 fits" in oversubscription_hint(4, 2, 8, 4.0)
    assert "fewer processes (trainer.devices)" in oversubscription_hint(1, 2, 2, 1.5)


def test_the_hint_reaches_stderr_at_run_time(tmp_path, capsys, monkeypatch):
    """setup prints it once, before anything is built (here a finished-run check is not in the way)."""
    import emformer.train.fit as fit

    monkeypatch.setattr(fit.os, "getloadavg", lambda: (64.0, 0.0, 0.0))
    from emformer.train.config import load_run_config

    cfg = load_run_config(DEBUG, ["trainer.threads=2", "trainer.accelerator=cpu"])
    torch_threads = torch.get_num_threads()
    try:
        assert fit.setup(cfg, tmp_path / "run", is_zero=True) is not None
    finally:
        torch.set_num_threads(torch_threads)
    err = capsys.readouterr().err
    assert err.count("emformer train: 2 thread(s) x 1 process(es) exceed") == 1
    assert not (tmp_path / "run").exists()


SHORT = ("trainer.val_every=10", "trainer.log_every=5", "trainer.ckpt_every=10", "eval.episodes=32",
         "trainer.progress=false")


@pytest.mark.slow
def test_init_from_starts_a_fresh_run_from_another_runs_weights(debug_run, tmp_path):
    """A run started from a finished run's dir evaluates at step 0 exactly as that run's best checkpoint did
    (same eval set, same weights), then trains its own steps from step 0, and its meta says where the weights
    came from."""
    source, tuned = debug_run[0], tmp_path / "tuned"
    # best.ckpt is the lowest val loss after step 0 (train/callbacks.py)
    best = min((row for row in rows(source) if row["split"] == "val" and row["step"] > 0), key=lambda row: row["loss"])
    result = train(tuned, "trainer.max_steps=5", "trainer.val_every=5", "trainer.progress=false",
                   f"trainer.init_from={source}")
    assert f"weights from {source / 'checkpoints' / 'best.ckpt'} (step {best['step']})" in result.stderr
    first = next(row for row in rows(tuned) if row["split"] == "val")
    assert first["step"] == 0 and (first["loss"], first["err"]) == (best["loss"], best["err"])
    assert json.loads((tuned / "DONE").read_text())["step"] == 5
    meta = json.loads((tuned / "meta.json").read_text())
    assert meta["init_from"] == {"path": str(source / "checkpoints" / "best.ckpt"), "step": best["step"]}


def test_init_from_another_model_shape_or_no_checkpoint_is_one_line_and_writes_nothing(tmp_path, capsys):
    from export_fixtures import make_fake_run

    source = make_fake_run(tmp_path / "source")
    assert run_cli(tmp_path / "wider", "model.width=64", f"trainer.init_from={source}") == 2
    err = capsys.readouterr().err
    assert f"{source / 'checkpoints' / 'best.ckpt'}: tensor '" in err and "different model shape" in err
    assert "trainer.init_from" in err and len(err.strip().splitlines()) == 1
    assert run_cli(tmp_path / "nowhere", f"trainer.init_from={tmp_path / 'missing'}") == 2
    assert "no such checkpoint file" in capsys.readouterr().err
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert run_cli(tmp_path / "bare", f"trainer.init_from={tmp_path / 'empty'}") == 2
    assert "without checkpoints/best.ckpt" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("wider", "nowhere", "bare"))


@pytest.mark.slow
def test_extend_continues_a_finished_run_exactly_as_a_longer_run(tmp_path):
    """20 steps, then --extend to 40, gives the rows of a straight 40-step run: the debug config warms up
    over 20 steps, so the first 20 steps follow the same schedule either way, and the restored schedule
    decays to the new end."""
    extended, straight = tmp_path / "extended", tmp_path / "straight"
    train(extended, *SHORT, "trainer.max_steps=20")
    assert json.loads((extended / "DONE").read_text())["step"] == 20
    result = subprocess.run([sys.executable, "-m", "emformer", "train", "--extend", "trainer.max_steps=40",
                             "trainer.threads=1", "--run-dir", str(extended)], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step 20" in result.stderr
    train(straight, *SHORT, "trainer.max_steps=40")
    assert json.loads((extended / "DONE").read_text())["step"] == 40
    assert_same_rows(rows(extended), rows(straight))
    no_duplicate_steps(extended)


def test_extend_refuses_other_changes_and_smaller_max_steps(tmp_path, capsys):
    from export_fixtures import make_fake_run

    run_dir = make_fake_run(tmp_path / "run")
    (run_dir / "DONE").write_text('{"step": 10}')
    before = snapshot(run_dir)
    from emformer.train.cli import main

    assert main(["train", "--extend", "model.depth=3", "trainer.max_steps=400", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "--extend: only trainer.max_steps may change" in err and "model.depth:" in err
    assert main(["train", "--extend", "trainer.max_steps=1", "--run-dir", str(run_dir)]) == 2
    assert "is below the run's" in capsys.readouterr().err
    assert main(["train", "--extend", "trainer.max_steps=400"]) == 2
    assert "--extend: give the run to continue with --run-dir DIR" in capsys.readouterr().err
    assert snapshot(run_dir) == before


def test_an_unused_centroid_head_is_refused_before_ddp_starts(tmp_path):
    """Without an init the loss never reads the centroid head, which DDP reports on every rank at the first
    step (a traceback, exit 1): the config check refuses it first, in one line, before any rank starts."""
    run_dir = tmp_path / "run"
    result = subprocess.run(train_command(run_dir, "model.centroid_head=true", "task.init=none", "trainer.devices=2"),
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "emformer train: error: model.centroid_head: expected false when task.init is none (no init to anchor the "
        "refined centroids to, so the head is never trained), got True"]
    assert not run_dir.exists()


@pytest.mark.parametrize("environ, zero", [
    # `srun --pty bash`: SLURM's variables are there but Lightning's SLURM detection is off (job named bash), so
    # Lightning starts the local ranks itself; every one inherits SLURM_PROCID=0, only LOCAL_RANK tells them apart.
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "bash", "LOCAL_RANK": "1"}, False),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "interactive"}, True),
    # srun launching every rank (an sbatch job): SLURM_PROCID is the global rank.
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_JOB_NAME": "train", "LOCAL_RANK": "0"}, False),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "train"}, True),
    ({"RANK": "1", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, False),  # torchrun's RANK first
    ({"NODE_RANK": "1"}, False),
    ({}, True),
])
def test_rank_zero_is_found_as_lightning_will_find_it(monkeypatch, environ, zero):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from emformer.train import fit

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert fit.is_global_zero() is zero
    monkeypatch.setattr("shutil.which", lambda name: None)  # no srun on PATH: detect() without its warning
    assert fit.slurm_launched() == SLURMEnvironment.detect()


@pytest.mark.slow
def test_passes_drawn_per_batch_and_length_buckets_resume_exactly(tmp_path):
    """A run drawing T in 1..3 per batch on length-bucketed batches, killed after step 50 (checkpoint at 40)
    and re-run: the same rows as the uninterrupted run (T and the bucket are pure functions of the step)."""
    overrides = ("model.passes=3", "model.passes_min=1", "task.n_max=64", "data.buckets=3", "trainer.max_steps=60",
                 "trainer.val_every=30", "trainer.ckpt_every=20", "eval.episodes=64")
    reference = tmp_path / "reference"
    train(reference, *overrides)
    run_dir = tmp_path / "run"
    train(run_dir, *overrides, extra_env={"EMFORMER_CRASH_AT_STEP": "50"}, expect=1)
    resumed = train(run_dir, *overrides)
    assert "resuming from step 40" in resumed.stderr
    no_duplicate_steps(run_dir)
    assert_same_rows(rows(run_dir), rows(reference))


@pytest.mark.slow
def test_a_model_trained_to_iterate_saves_every_pass_against_em_iterations(tmp_path):
    """episodes.npz of a 2-pass model: err after each pass and EM's after each iteration, [E, 2]; the last
    pass is the model's err, EM's second iteration its err_em (eval.em_iters = 2)."""
    import numpy as np

    from emformer.train.rundir import read_episode_results

    run_dir = tmp_path / "run"
    assert run_cli(run_dir, "model.passes=2", "trainer.max_steps=6", "trainer.val_every=6", "trainer.log_every=6",
                   "trainer.ckpt_every=6", "eval.episodes=24", "eval.em_iters=2") == 0
    episodes = read_episode_results(run_dir)
    assert episodes["err_pass"].shape == episodes["err_em_iter"].shape == (24, 2)
    assert ((episodes["err_pass"] >= 0) & (episodes["err_pass"] <= 1)).all()
    assert np.array_equal(episodes["err_pass"][:, -1], episodes["err_model"])
    assert np.array_equal(episodes["err_em_iter"][:, -1], episodes["err_em"])
