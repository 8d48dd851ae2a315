"""Sweep specs, their points and the sweep directory; the local backend end to end (real `emformer train`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from emformer.errors import ConfigError
from emformer.train.cli import main
from emformer.train.sweep.spec import expand_points, load_spec, load_sweep, prepare_sweep
from emformer.train.sweep.status import point_statuses, points_to_run

REPO = Path(__file__).resolve().parents[3]
SWEEPS = REPO / "configs" / "sweeps"
DEBUG_SPEC = SWEEPS / "debug.yaml"
DEBUG_RUN = REPO / "configs" / "debug.yaml"


def write_spec(tmp_path: Path, **spec) -> Path:
    spec.setdefault("name", "t")
    spec.setdefault("base", str(DEBUG_RUN))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_expands(path: Path) -> None:
    points = expand_points(load_spec(path))
    assert points and len({p.name for p in points}) == len(points)


def test_debug_grid_points_are_deterministic_and_carry_the_swept_values() -> None:
    spec = load_spec(DEBUG_SPEC)
    points = expand_points(spec)
    assert [(p.id, p.overrides) for p in points] == [
        (0, {"model.depth": 1, "model.heads": 1}), (1, {"model.depth": 1, "model.heads": 2}),
        (2, {"model.depth": 2, "model.heads": 1}), (3, {"model.depth": 2, "model.heads": 2})]
    for point in points:
        cfg = point.config
        assert (cfg.model.depth, cfg.model.heads) == (point.overrides["model.depth"], point.overrides["model.heads"])
        assert cfg.trainer.max_steps == 100 and cfg.wandb.group == "debug"  # overrides + the sweep's group
        assert point.run_dir == f"runs/{point.name}" and point.name.startswith("debug-")
    assert [p.name for p in expand_points(load_spec(DEBUG_SPEC))] == [p.name for p in points]


def test_seeds_multiply_the_grid_seed_major(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, grid={"model.depth": [1, 2]}, points=[{"model.width": 16}],
                                seeds=[3, 4]))
    points = expand_points(spec)
    assert [(p.seed, p.overrides) for p in points] == [
        (3, {"model.depth": 1}), (3, {"model.depth": 2}), (3, {"model.width": 16}),
        (4, {"model.depth": 1}), (4, {"model.depth": 2}), (4, {"model.width": 16})]
    assert all(p.config.trainer.seed == p.seed == p.config.data.seed for p in points)
    assert len({p.name for p in points}) == 6


def test_command_line_overrides_reach_points_and_spec(tmp_path: Path) -> None:
    spec = load_spec(DEBUG_SPEC, ["trainer.max_steps=7", "sweep.local.parallel=3", "sweep.seeds=[1]"])
    assert spec.local.parallel == 3 and spec.seeds == [1]
    assert {p.config.trainer.max_steps for p in expand_points(spec)} == {7}


@pytest.mark.parametrize("spec, message", [
    ({"grid": {}}, "the sweep is empty"),
    ({"grid": {"model.depth": []}}, "grid.model.depth: expected a non-empty list"),
    ({"grid": {"model.dept": [1, 2]}}, "'model.dept' is not a key of the run config"),
    ({"grid": {"model": [1]}}, "model"),
    ({"grid": {"trainer.seed": [1, 2]}}, "seeds are set by 'seeds:'"),
    ({"grid": {"model.depth": [1]}, "seeds": []}, "seeds: expected a non-empty list"),
    ({"grid": {"model.depth": [1]}, "gird": {}}, "unknown key(s) ['gird']"),
    ({"grid": {"model.depth": [1]}, "local": {"parallel": 0}}, "local.parallel"),
    ({"grid": {"model.heads": [3]}}, "point 0"),  # width 32 is not divisible by 3 heads
    ({"points": [{"model.depth": 1}, {"model.depth": 1}]}, "are the same run"),
    ({"grid": {"model.depth": [1]}, "base": "nowhere.yaml"}, "run config not found"),
])
def test_bad_specs_are_refused_naming_the_problem(tmp_path: Path, spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        expand_points(load_spec(write_spec(tmp_path, **spec)))
    assert message in str(info.value)


def test_sweep_dir_holds_spec_index_and_run_configs(tmp_path: Path) -> None:
    sweep = prepare_sweep(load_spec(DEBUG_SPEC), tmp_path / "s")
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert [p["name"] for p in index["points"]] == [p.name for p in sweep.points]
    for point in sweep.points:
        saved = yaml.safe_load((sweep.run_dir(point) / "config.yaml").read_text())
        assert saved["model"]["depth"] == point.overrides["model.depth"]
    reopened = load_sweep(tmp_path / "s")
    assert [(p.id, p.name, p.overrides) for p in reopened.points] == [(p.id, p.name, p.overrides) for p in sweep.points]
    assert reopened.spec.group == "debug"
    # Re-opening with the same spec is fine (that is how a sweep is resumed).
    prepare_sweep(load_spec(DEBUG_SPEC), tmp_path / "s")
    # The base is written relative to the sweep dir: a committed or copied sweep names no machine's path.
    base = yaml.safe_load((tmp_path / "s" / "sweep.yaml").read_text())["base"]
    assert not Path(base).is_absolute() and (tmp_path / "s" / base).resolve() == DEBUG_SPEC.parent.joinpath(
        yaml.safe_load(DEBUG_SPEC.read_text())["base"]).resolve()


def test_a_sweep_dir_of_another_spec_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prepare_sweep(load_spec(DEBUG_SPEC), tmp_path / "s")
    with pytest.raises(ConfigError, match="made by a different sweep spec.*refusing to mix"):
        prepare_sweep(load_spec(DEBUG_SPEC, ["trainer.max_steps=50"]), tmp_path / "s")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["sweep", str(DEBUG_SPEC), "--out", str(tmp_path / "other")]) == 2
    assert "holds no sweep" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "other")]) == 2
    assert "not a sweep directory" in capsys.readouterr().err


def test_a_spec_that_only_adds_runs_extends_the_sweep_and_keeps_every_old_id(tmp_path: Path) -> None:
    """How a committed study grows a family: new points and seeds join, every old run keeps its id (a SLURM
    array or launch record in flight names runs by id), its config and its files; dropping a run is refused."""
    def spec(depths: list[int], seeds: list[int]) -> Path:
        return write_spec(tmp_path, overrides={"trainer.max_steps": 20}, grid={"model.depth": depths,
                                                                               "model.heads": [1, 2]}, seeds=seeds)

    sweep_dir = tmp_path / "s"
    old = prepare_sweep(load_spec(spec([1, 2], [0])), sweep_dir)
    marker = old.run_dir(old.points[3]) / "DONE"
    marker.write_text("{}")
    wider = prepare_sweep(load_spec(spec([1, 2, 4], [0, 1])), sweep_dir)
    ids = {p.name: p.id for p in wider.points}
    assert all(ids[p.name] == p.id for p in old.points)
    assert sorted(ids.values()) == list(range(12)) and [p.id for p in wider.points] == sorted(ids.values())
    assert marker.read_text() == "{}"
    assert [(p["id"], p["name"]) for p in json.loads((sweep_dir / "index.json").read_text())["points"]] == [
        (p.id, p.name) for p in wider.points]
    assert {p.id for p in load_sweep(sweep_dir).points} == set(range(12))
    todo, skipped = points_to_run(wider)
    assert skipped == {"done": [3]} and len(todo) == 11
    # re-opening with the wider spec is a resume: the same ids again
    again = prepare_sweep(load_spec(spec([1, 2, 4], [0, 1])), sweep_dir)
    assert [(p.id, p.name) for p in again.points] == [(p.id, p.name) for p in wider.points]
    with pytest.raises(ConfigError, match="4 missing.*refusing to mix.*only adds points extends"):
        prepare_sweep(load_spec(spec([2, 4], [0, 1])), sweep_dir)


@pytest.mark.slow
def test_local_backend_runs_k_at_a_time_and_resumes_a_crashed_point(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "local"
    spec = write_spec(tmp_path, base=str(DEBUG_RUN), grid={"model.heads": [1, 2]},
                      overrides={"model.depth": 1, "trainer.max_steps": 20, "trainer.val_every": 10,
                                 "trainer.ckpt_every": 10, "trainer.log_every": 5, "trainer.progress": False,
                                 "eval.episodes": 32},
                      local={"parallel": 2, "threads_per_run": 1})
    # First pass: every run dies right after step 10's checkpoint.
    monkeypatch.setenv("EMFORMER_CRASH_AT_STEP", "10")
    assert main(["sweep", str(spec), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "[0/2] started point 0" in printed and "[0/2] started point 1" in printed  # both at once
    assert "FAILED (exit 1)" in printed
    sweep = load_sweep(out)
    statuses = point_statuses(sweep)
    assert [(s.state, s.step, s.backend) for s in statuses] == [("failed", 10, "local")] * 2
    assert statuses[0].detail == "exit 1" and statuses[0].log == f"{sweep.points[0].run_dir}/console.log"
    assert any("from scratch" in line for line in statuses[0].log_tail)
    assert [p.id for p in points_to_run(sweep)[0]] == [0, 1]

    # Second pass resumes both from last.ckpt; a third one has nothing left to do.
    monkeypatch.delenv("EMFORMER_CRASH_AT_STEP")
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("(resuming from last.ckpt)") == 2 and "2 done, 0 failed" in printed
    for point in sweep.points:
        assert "resuming from step 10" in (sweep.run_dir(point) / "console.log").read_text()
        steps = [json.loads(line)["step"] for line in (sweep.run_dir(point) / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["split"] == "train"]
        assert steps == [5, 10, 15, 20]  # no step twice
    assert [s.state for s in point_statuses(sweep)] == ["done", "done"]
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    assert "nothing to run" in capsys.readouterr().out


def test_point_configs_equal_a_plain_load_config() -> None:
    """expand_points builds configs by a faster path than load_config: it must give the same configs."""
    from omegaconf import OmegaConf

    from emformer.train.config import load_config

    spec = load_spec(DEBUG_SPEC, ["sweep.seeds=[0,2]", "trainer=cpu"])
    for point in expand_points(spec):
        items = [f"{k}={v}" if k == "trainer" else f"{k}={json.dumps(v)}"
                 for k, v in {**spec.overrides, **point.overrides}.items()]
        items += [f"trainer.seed={point.seed}", f"data.seed={point.seed}", "wandb.group=debug"]
        assert OmegaConf.to_container(point.config) == OmegaConf.to_container(load_config(spec.base, items))
