"""`emformer study`: the shipped spec has what the study needs (five seeds, four checks and passes against EM), and
the command runs end to end at a microscopic size, resumes (skips finished runs from their small files alone)
and rebuilds the same report from committed-style run directories (no checkpoints)."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from emformer.train import rundir
from emformer.train.report import build as report
from emformer.train.report.summary import format_summary
from emformer.train.sweep.spec import expand_points, load_spec, prepare_sweep
from emformer.train.sweep.status import points_to_run

REPO = Path(__file__).resolve().parents[2]
STUDY = REPO / "configs" / "sweeps" / "study.yaml"
COMMITTED = REPO / "docs" / "study"
REPLICATION = REPO / "docs" / "study-replication"
REPLICATION_SEEDS = ["sweep.seeds=[5,6,7,8,9]"]  # what `make study-replication` passes


def _n(point) -> float:
    return math.inf if point.config.data.source == "fresh" else point.config.data.pool_size


def test_the_study_spec_covers_the_four_checks_from_five_seeds():
    spec = load_spec(STUDY)
    seeds, spec.seeds = spec.seeds, spec.seeds[:1]  # every seed expands the same points
    points = expand_points(spec)
    assert len(seeds) >= 5 and spec.local.parallel == 2 and spec.local.threads_per_run == 1
    cfg = points[0].config
    assert (cfg.task.k, cfg.task.d, cfg.task.n) == (2, 4, 64) and cfg.model.width == 32
    base = [p for p in points if (p.config.model.depth, p.config.model.heads, p.config.task.separation,
                                  p.config.task.init_noise) == (2, 2, 3.0, 0.3)]
    sizes = sorted(_n(p) for p in base)
    assert sizes[-1] == math.inf and len(sizes) - 1 >= 7  # ≥ 6 above a memorisation probe, plus fresh
    fresh = [p.config for p in points if _n(p) == math.inf]
    depth = {c.model.depth for c in fresh if c.task.init_noise == 1.0}
    heads = {c.model.heads for c in fresh if c.task.init_noise == 0.3 and c.task.separation == 3.0 and c.model.depth == 2}
    deltas = {c.task.separation for c in fresh if c.model.heads == 2 and c.model.depth == 2 and c.task.init_noise == 0.3}
    assert depth == {1, 2, 4, 8} and heads == {1, 2, 4, 8} and deltas == {float(d) for d in range(1, 7)}
    # passes against EM iterations: one point trained to iterate, the depth family's L = 2 otherwise
    (looped,) = [c for c in fresh if c.model.passes > 1]
    assert looped.model.depth == 2 and looped.task.init_noise == 1.0 and looped.model.passes == 4


TINY = """\
name: tiny_study
base: {base}
overrides:
  name: tiny_study
  task.n: 16
  data.batch_size: 8
  optim.warmup_steps: 2
  trainer.max_steps: 8
  trainer.val_every: 4
  trainer.log_every: 2
  trainer.ckpt_every: 8
  trainer.progress: false
  eval.episodes: 32
  eval.batch_size: 32
  wandb.mode: disabled
points:
  - {{data.source: pool, data.pool_size: 32}}
  - {{data.source: pool, data.pool_size: 64}}
  - {{data.source: fresh}}
  - {{data.source: fresh, model.depth: 1}}
seeds: [0, 1]
local: {{parallel: 2, threads_per_run: 1}}
"""


def _study(spec: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "emformer", "study", "--spec", str(spec), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_study_runs_resumes_and_rebuilds_its_report_from_small_files(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY.format(base=REPO / "configs" / "debug.yaml"))
    out = tmp_path / "study"
    first = _study(spec, out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "8 runs" in first.stdout and "8 to run" in first.stdout
    report_md = out / "report.md"  # beside sweep/, as docs/study/report.md
    assert "95% t (2 seeds; × 32 eval episodes" in report_md.read_text() and "interval method" in report_md.read_text()

    # the committed copy: small files only (what docs/study/ holds), in a fresh place
    committed = tmp_path / "committed"
    shutil.copytree(out / "sweep", committed / "sweep",
                    ignore=shutil.ignore_patterns("checkpoints", "console.log", "local", "*.png"))
    assert not list(committed.rglob("*.ckpt"))
    metrics = sorted(committed.rglob("metrics.jsonl"))
    before = {p: p.read_bytes() for p in metrics}
    again = _study(spec, committed)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "0 to run, skipped: 8 done" in again.stdout  # finished runs are known by config.yaml + DONE alone
    assert {p: p.read_bytes() for p in metrics} == before

    rebuilt = report.build_report(committed / "sweep", tmp_path / "rebuilt", wandb_mode="disabled")
    original = report.build_report(out / "sweep", tmp_path / "original", wandb_mode="disabled")
    assert format_summary(rebuilt) == format_summary(original)


@pytest.mark.parametrize("committed_dir, overrides", [(COMMITTED, []), (REPLICATION, REPLICATION_SEEDS)])
def test_a_rerun_of_the_study_skips_every_committed_run(tmp_path, committed_dir, overrides):
    """What `make study` (and `make study-replication`) does first, on a copy of the committed sweep: the
    spec re-expands to the committed runs (same config hashes, or prepare_sweep refuses) and every one is
    done from its small files alone."""
    committed = tmp_path / "sweep"
    shutil.copytree(committed_dir / "sweep", committed)
    sweep = prepare_sweep(load_spec(STUDY, overrides), committed)
    todo, skipped = points_to_run(sweep)
    runs = len(load_spec(STUDY).points) * len(load_spec(STUDY, overrides).seeds)
    assert len(sweep.points) == runs and todo == [] and skipped == {"done": sorted(p.id for p in sweep.points)}
    assert rundir.read_index(committed) == rundir.read_index(committed_dir / "sweep")
    assert (committed_dir / "report.md").is_file() and not (committed_dir / "report").exists()
    assert all(rundir.read_episode_results(committed / p["run_dir"]) is not None for p in rundir.read_index(committed))


def test_the_replication_has_other_seeds_and_so_other_eval_sets():
    seeds = [{p["seed"] for p in rundir.read_index(d / "sweep")} for d in (COMMITTED, REPLICATION)]
    assert len(seeds[0]) == len(seeds[1]) == 5 and not seeds[0] & seeds[1]
    eval_seeds = [{rundir.read_config(d / "sweep" / p["run_dir"])["eval"]["seed"] for p in rundir.read_index(d / "sweep")}
                  for d in (COMMITTED, REPLICATION)]
    assert len(eval_seeds[0]) == 5 and not eval_seeds[0] & eval_seeds[1]


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    """Both committed studies' reports, rebuilt from their run files."""
    out = tmp_path_factory.mktemp("rebuilt")
    return [report.build_report(d / "sweep", out / d.name, wandb_mode="disabled") for d in (COMMITTED, REPLICATION)]


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1])
def test_the_committed_study_reports_are_what_emformer_report_rebuilds(rebuilt, which):
    """docs/study/report.md (and the replication's) is in step with the code: rebuilt from the committed
    run files, it is the same text (but the out directory named in its first line) and the same figures."""
    directory, result = (COMMITTED, REPLICATION)[which], rebuilt[which]
    committed = (directory / "report.md").read_text().splitlines()
    assert committed[3:] == result.report_path.read_text().splitlines()[3:]
    assert sorted(p.name for p in result.figures.values()) == sorted(p.name for p in directory.glob("*.png"))


@pytest.mark.slow
def test_the_readme_leads_with_the_replication_table_that_emformer_replication_writes(rebuilt):
    from emformer.train.report import replication

    text = replication.render(replication.compare(*rebuilt), [Path("docs/study"), Path("docs/study-replication")],
                              rebuilt[0])
    readme = (REPO / "README.md").read_text()
    assert readme.index(replication.START) < readme.index("## The two commands")
    assert f"{replication.START}\n{text}{replication.END}" in readme
    assert (REPO / "docs" / "replication.md").read_text().endswith(text)


SMALL_RUN_FILES = {"DONE", "config.yaml", "meta.json", "metrics.jsonl", "episodes.npz"}


@pytest.mark.parametrize("committed_dir", [COMMITTED, REPLICATION], ids=lambda d: d.name)
def test_a_committed_study_holds_each_run_s_small_files_only(committed_dir):
    """What git holds of a committed study (a fresh clone has nothing else): per run, the files the report and a
    re-run need; never a checkpoint, console log, per-run figure or local launch record."""
    listed = subprocess.run(["git", "ls-files", str(committed_dir.relative_to(REPO))], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    runs = [Path(line) for line in listed.stdout.splitlines() if "/sweep/runs/" in line]
    assert runs and {path.name for path in runs} == SMALL_RUN_FILES
    assert not [line for line in listed.stdout.splitlines() if "/sweep/local/" in line]
