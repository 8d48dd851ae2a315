"""`emformer report` on fabricated sweep directories (config.yaml + metrics.jsonl exactly as the contracts).

The fabricated metrics follow known laws, so the checks' verdicts are known: the excess test loss falls as
N^(−1), the train/test gap as N^(−0.9), err falls with depth and heads, and err tracks the oracle across Δ.
N = 64 memorises by the train-loss criterion, N = 128 only by ending worse than the init alone.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from emformer.errors import ConfigError
from emformer.train.report import checks
from emformer.train.report import build as report
from emformer.train.report.result import FIGURES, NOT_IN_SWEEP
from emformer.train.report.summary import format_summary
from emformer.train.config import load_config, run_name, save_yaml

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
BASE = ["eval.episodes=64", "wandb.mode=disabled", "trainer.max_steps=200", "trainer.val_every=100"]
INIT_LOSS = 0.2250  # init-only loss of configs/debug.yaml's task on eval.episodes=64 of seed 0's eval set
# (eval.seed 1_000_000_000; computed by the report, as these fabricated rows carry no loss_init; recorded at
# EPISODES_VERSION 5; 0.2052 on the eval.seed 1_000_003 that every seed shared before)


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _final_values(cfg, seed: int) -> dict[str, float]:
    """A known law for every metric of the final val row."""
    n = math.inf if cfg.data.source == "fresh" else cfg.data.pool_size
    delta, depth, heads = cfg.task.separation, cfg.model.depth, cfg.model.heads
    wiggle = 1 + 0.03 * math.sin(7 * seed + 3)
    oracle = _phi(-delta / 2)
    err = oracle * 1.3 + 0.02 / depth + 0.01 / heads
    if cfg.task.noise == "student_t":
        err *= 1.5
    loss_inf = 0.18 + 0.001 * math.cos(5 * seed)  # below INIT_LOSS, as a model that learned the task
    if n == math.inf:
        loss, gap = loss_inf, 0.0005
    elif n < 128:
        loss, gap = 0.5, 0.45  # memorised: train loss 0.05, far below half the fresh run's 0.18
    elif n < 512:
        loss, gap = 0.3, 0.1  # memorised: worse than the init alone, train loss 0.2 above half the fresh run's
    else:
        loss, gap = loss_inf + 10.0 / n * wiggle, 5.0 * n ** -0.9 * wiggle
    return {
        "loss": loss, "err": err * wiggle, "err_anchored": err, "ari": 0.8, "train_loss": loss - gap,
        "train_err": err, "err_em": oracle * 1.5 + 0.01, "err_em_anchored": oracle * 1.6, "loss_em": 0.22,
        "err_lloyd": oracle * 1.7 + 0.01, "err_oracle": oracle, "err_oracle_anchored": oracle, "loss_oracle": 0.15,
        "err_em_depth": oracle * 1.5 + 0.04 / depth, "err_em_depth_anchored": oracle * 1.6 + 0.04 / depth,
    }


def make_run(runs_dir: Path, overrides: list[str], seed: int, *, done: bool = True, metrics: bool = True,
             last_step: int | None = None) -> Path:
    cfg = load_config(CONFIGS / "debug.yaml", [*BASE, *overrides, f"trainer.seed={seed}", f"data.seed={seed}"])
    run_dir = runs_dir / run_name(cfg)
    run_dir.mkdir(parents=True)
    save_yaml(cfg, run_dir / "config.yaml")
    if not metrics:
        return run_dir
    final = _final_values(cfg, seed)
    rows = []
    last = last_step if last_step is not None else cfg.trainer.max_steps
    for step in range(cfg.trainer.log_every, last + 1, cfg.trainer.log_every):
        rows.append({"step": step, "split": "train", "loss": final["loss"] + 1.0 / step, "lr": 1e-3,
                     "episodes_per_s": 100.0, "tokens_per_s": 3200.0})
        if step % cfg.trainer.val_every == 0:
            scale = 1 + (cfg.trainer.max_steps - step) / cfg.trainer.max_steps
            rows.append({"step": step, "split": "val", **{k: v * (scale if k in ("loss", "err") else 1)
                                                        for k, v in final.items()}})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if done:
        (run_dir / "DONE").write_text(json.dumps(rows[-1]))
    return run_dir


def make_sweep(root: Path, seeds=(0, 1, 2)) -> Path:
    """Every family the report knows, plus a missing, a partial, a metrics-less and a corrupt run."""
    sweep = root / "sweep"
    runs = sweep / "runs"
    points = [["data.source=fresh"]]
    points += [["data.source=pool", f"data.pool_size={n}"] for n in (64, 128, 512, 1024, 2048, 4096)]
    points += [["data.source=fresh", f"model.depth={d}"] for d in (1, 4)]
    points += [["data.source=fresh", f"model.heads={m}"] for m in (1, 4)]
    points += [["data.source=fresh", f"task.separation={s}"] for s in (2.0, 4.0, 5.0)]
    points += [["data.source=fresh", "task.noise=student_t"], ["data.source=fresh", "task.init=none"]]
    index = []
    for overrides in points:
        for seed in seeds:
            index.append({"run_dir": str(make_run(runs, overrides, seed).relative_to(sweep))})
    partial = make_run(runs, ["data.source=pool", "data.pool_size=8192"], 0, done=False, last_step=100)
    empty = make_run(runs, ["data.source=pool", "data.pool_size=8192"], 1, metrics=False)
    index += [{"run_dir": str(partial.relative_to(sweep))}, {"run_dir": str(empty.relative_to(sweep))},
              {"run_dir": "runs/never-started-00000000"}]
    (sweep / "index.json").write_text(json.dumps({"points": index}))
    (sweep / "sweep.yaml").write_text("name: fabricated\n")
    return sweep


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    sweep = make_sweep(tmp_path_factory.mktemp("report"))
    corrupt = sorted(p for p in (sweep / "runs").glob("*/metrics.jsonl") if (p.parent / "DONE").is_file())[0]
    lines = corrupt.read_text().splitlines(keepends=True)
    lines.insert(2, "{not json\n")
    corrupt.write_text("".join(lines))
    return sweep, corrupt, report.build_report(sweep, sweep / "report")


def test_report_writes_every_plot_and_the_summary_table(built):
    sweep, _, result = built
    for name in ("curves", "sample_complexity", "depth_heads", "separation"):
        path = result.figures[name]
        assert path.is_file() and path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
    text = result.report_path.read_text()
    assert text.index("## Summary") < text.index("## Sample complexity")
    for name, figure in FIGURES.items():  # passes_em.png needs per-pass episode files: tested on its own below
        assert (f"]({figure})" in text) == (name != "passes")
    assert "not in this sweep" not in text
    assert NOT_IN_SWEEP not in format_summary(result)


def test_the_checks_come_out_as_the_fabricated_laws_say(built):
    _, _, result = built
    sc = result.sections.sample_complexity
    assert sc.memorised == [64.0, 128.0]
    assert sc.memorised_by[64.0].startswith(checks.TRAIN_CRITERION)
    assert sc.memorised_by[128.0].startswith(checks.INIT_CRITERION)
    assert "N = 128: worse than the init: test loss 0.3 > init-only loss" in result.report_path.read_text()
    assert sc.fitted == [512.0, 1024.0, 2048.0, 4096.0]
    assert sc.init_loss == pytest.approx(INIT_LOSS, abs=1e-3)
    assert sc.excess_fit.method == "t" and sc.excess_fit.label == "95% t (3 seeds)"
    assert sc.excess_fit.low <= -1.0 + 1e-6 and -1.0 - 1e-6 <= sc.excess_fit.high
    # the N = 8192 runs of this family never finished: PASS on the survivors would hide them
    assert sc.excess_verdict == "INCONCLUSIVE" and sc.gap_verdict == "INCONCLUSIVE"
    assert any("no DONE" in name for name in sc.incomplete) and "unfinished" in sc.verdict_and_reason[1]
    finished = checks.sample_complexity(result.sections.points, [r for r in result.runs if r.complete])
    assert finished.excess_verdict == "PASS", finished.verdict_and_reason
    assert finished.gap_fit.estimate == pytest.approx(-0.9, abs=0.05) and finished.gap_verdict == "PASS"
    assert [t.verdict for t in result.sections.depth] == [checks.FALLS]
    assert [t.verdict for t in result.sections.heads] == [checks.FALLS]
    (sep,) = result.sections.separation
    assert 2.0 in sep.excluded and sep.fitted == [3.0, 4.0, 5.0]
    beyond = {r.setting: r for r in result.sections.beyond}
    assert any("student_t" in name for name in beyond)
    by_check = {c.name: c for c in result.checks}
    combined = by_check["sample complexity: test loss_N − test loss_∞ ∝ N^b (all three estimates)"]
    assert combined.verdict == "INCONCLUSIVE" and "no DONE" in combined.sentence
    assert all(c.method.startswith("95% t (3 seeds)") for c in result.checks if c.interval not in ("—", "see below"))


def test_missing_partial_and_metricless_runs_are_listed(built):
    sweep, _, result = built
    states = {r.path.name: r.state for r in result.runs}
    assert states["never-started-00000000"] == "missing"
    assert sorted(states.values()).count("partial") == 1
    assert sorted(states.values()).count("no metrics") == 1
    text = result.report_path.read_text()
    runs_section = text[text.index("## Runs"):text.index("## Training curves")]
    assert "never-started-00000000" in runs_section
    assert "no DONE: last logged step 100 of 200" in runs_section
    assert "no metrics.jsonl yet" in runs_section


def test_a_corrupt_line_is_reported_with_file_and_line_and_the_rest_is_used(built, capsys):
    sweep, corrupt, result = built
    assert result.problems == [f"{corrupt}:3: not valid JSON (Expecting property name enclosed in double quotes at column 2)"]
    assert f"{corrupt}:3:" in result.report_path.read_text()
    assert result.exit_code == 1
    bad_run = next(r for r in result.runs if r.path == corrupt.parent)
    assert bad_run.complete and len(bad_run.val_rows) == 2


def test_cli_prints_the_summary_and_exits_1_on_corrupt_input(tmp_path, capsys):
    from emformer.train.cli import main

    sweep = tmp_path / "small"
    runs = [make_run(sweep / "runs", ["data.source=fresh"], seed) for seed in (0, 1)]
    metrics = runs[1] / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "split": "val", "loss": 0.3}\n' + "[1, 2]\n")
    code = main(["report", str(sweep), "--out", str(tmp_path / "r"), "--wandb", "disabled"])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"report: {tmp_path / 'r' / 'report.md'}" in out and "verdict" in out and "not in this sweep" in out
    lines = len(metrics.read_text().splitlines())
    assert f"{metrics}:{lines}: expected an object" in err


def test_a_sweep_without_the_axes_says_not_in_this_sweep(tmp_path):
    sweep = tmp_path / "single"
    for seed in (0, 1):
        make_run(sweep / "runs", ["data.source=fresh"], seed)
    result = report.build_report(sweep, tmp_path / "out")
    assert result.exit_code == 0
    assert set(result.figures) == {"curves"}
    assert [c.verdict for c in result.checks].count(NOT_IN_SWEEP) == 5
    assert "Not in this sweep" in result.report_path.read_text()


def test_no_runs_at_all_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no runs found"):
        report.build_report(tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="not found"):
        report.build_report(tmp_path / "absent", tmp_path / "out")


def test_test_time_shifts_evaluate_each_checkpoint_against_em(tmp_path):
    """--test-shift: the run's checkpoint on its task with other n / k at test time, EM on the same episodes."""
    from export_fixtures import make_fake_run

    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        run = make_fake_run(sweep / "runs" / f"fake-{seed}", overrides=(f"trainer.seed={seed}", f"data.seed={seed}"),
                            seed=seed)
        (run / "DONE").write_text("{}")
    result = report.build_report(sweep, tmp_path / "out", wandb_mode="disabled",
                                 test_shifts=["task.n=48", "task.k=3,task.n=24", "task.separation=6.0"])
    assert result.problems == []
    rows = {r.setting.split("; ")[-1]: r for r in result.sections.beyond}
    assert set(rows) == {"all runs", "test n=48", "test k=3, n=24", "test separation=6.0"}
    for name in ("test n=48", "test k=3, n=24", "test separation=6.0"):
        row = rows[name]
        assert row.seeds == 2 and 0 <= row.err_oracle <= row.err_em <= 1 and 0 < row.err <= 1
        assert math.isfinite(row.difference) and row.se > 0 and "per episode" in row.se_method
        assert row.beats_em in ("yes", "no", "tie (within 2 SE)")
    # the debug task has Δ = 3 (oracle err ≈ Φ(−1.5) = 0.067); at Δ = 6 it is ≈ Φ(−3) = 0.0013
    assert rows["test n=48"].err_oracle == pytest.approx(0.067, abs=0.02)
    assert rows["test separation=6.0"].err_oracle < 0.01
    assert "test k=3, n=24" in result.report_path.read_text()

    with pytest.raises(ConfigError, match="task.KEY=VALUE"):
        report.build_report(sweep, tmp_path / "bad", test_shifts=["task.d=8"])



def test_passes_against_em_iterations_verdicts_follow_the_episodes(tmp_path):
    """Runs of a model trained to iterate with fabricated per-pass episodes: after 1 pass it errs far more
    than EM after 1 iteration, after 2 exactly as EM, after 3 far less; the section, its figure and the
    summary row say LOSES, TIE, BEATS. A sweep without per-pass episodes has no such section."""
    import numpy as np

    from emformer.train import rundir

    sweep = tmp_path / "iterated"
    episodes, points = 64, np.full(64, 40)
    for seed in range(5):
        run_dir = make_run(sweep / "runs", ["data.source=fresh", "model.passes=3"], seed)
        rng = np.random.default_rng(seed)
        em = rng.binomial(40, [0.3, 0.15, 0.1], size=(episodes, 3)) / 40
        model = np.stack([np.minimum(em[:, 0] + rng.binomial(40, 0.2, episodes) / 40, 1), em[:, 1],
                          rng.binomial(40, 0.01, episodes) / 40], axis=1)
        rundir.write_episode_results(run_dir, {"points": points, "k": np.full(episodes, 2),
                                               "err_model": model[:, -1], "err_em": em[:, -1],
                                               "err_pass": model, "err_em_iter": em}, step=200,
                                     eval_seed=1_000_000_000 + seed)
    result = report.build_report(sweep, tmp_path / "out")
    (comparison,) = result.sections.passes
    assert comparison.passes == [1, 2, 3]
    assert [r.verdict for r in comparison.rows] == [checks.LOSES, checks.TIE, checks.BEATS]
    assert comparison.rows[1].difference.estimate == 0.0
    assert comparison.rows[0].difference.method == "two-level bootstrap"
    assert comparison.model[2].estimate < comparison.em[2].estimate and comparison.em[0].ok
    text = result.report_path.read_text()
    assert "## Passes against EM iterations" in text and f"]({FIGURES['passes']})" in text
    assert "| 3 |" in text and f"**{checks.BEATS}**" in text
    assert result.figures["passes"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (row,) = [c for c in result.checks if c.name.startswith("passes against EM iterations")]
    assert "loses to em at t ∈ {1}" in row.sentence and "beats em at t ∈ {3}" in row.sentence
    assert row.verdict == "—"  # mixed over t: no one verdict (one where every t agrees)

    plain = tmp_path / "plain"
    make_run(plain / "runs", ["data.source=fresh"], 0)
    result = report.build_report(plain, tmp_path / "plain-out")
    assert result.sections.passes == [] and "passes" not in result.figures
    assert "Passes against EM iterations" not in result.report_path.read_text()
