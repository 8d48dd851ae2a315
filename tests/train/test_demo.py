"""`emformer demo`: its specs are the repository's, found from any working directory, and `--quick` runs the
whole path (sweep -> real training runs -> report) in tiny runs. The shipped sweep specs expand into the
families the report's checks need."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emformer.errors import ConfigError
from emformer.train import demo
from emformer.train.sweep.spec import expand_points, load_spec

SWEEPS = Path(__file__).resolve().parents[2] / "configs" / "sweeps"


def test_the_demo_specs_come_from_the_repository_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert demo.spec_path(False) == SWEEPS / "demo.yaml"
    assert demo.spec_path(True) == SWEEPS / "demo_quick.yaml"


def test_a_missing_spec_is_a_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "package_configs", lambda: tmp_path / "configs")
    with pytest.raises(ConfigError, match=r"demo\.yaml is missing: .*pip install -e"):
        demo.spec_path(False)


def _n(point) -> float:
    return math.inf if point.config.data.source == "fresh" else point.config.data.pool_size


def test_the_demo_sweep_is_the_design_s_small_check():
    """DESIGN §3: k=2, d=4, n=64, Δ=3, L=2, M=2, D=32; N = 512..4096 (half octaves) plus fresh; depth 1, 2, 4 at N = ∞."""
    spec = load_spec(SWEEPS / "demo.yaml")
    points = expand_points(spec)
    assert len(spec.seeds) >= 2 and spec.local.parallel == 2 and spec.local.threads_per_run == 1
    first = [p for p in points if p.seed == spec.seeds[0]]
    cfg = first[0].config
    assert (cfg.task.k, cfg.task.d, cfg.task.n, cfg.task.separation) == (2, 4, 64, 3.0)
    assert len({p.config.trainer.max_steps for p in points}) == 1
    at_l2 = sorted(_n(p) for p in first if p.config.model.depth == 2 and p.config.task.init_noise == 0.3)
    assert at_l2 == [512, 1024, 1448, 2048, 2896, 4096, math.inf]
    depth = [p.config for p in first if _n(p) == math.inf and p.config.task.init_noise == 1.0]
    assert sorted(c.model.depth for c in depth) == [1, 2, 4]


def _first_seed(path: Path):
    """The spec and its points for the first seed only (every point is a validated run config; seeds only
    change the two seed keys, and loading ~300 configs would cost the suite a minute)."""
    spec = load_spec(path)
    seeds, spec.seeds = spec.seeds, spec.seeds[:1]
    return seeds, expand_points(spec)


def test_the_shipped_sweeps_expand_into_the_report_s_families():
    loaded = {path.stem: _first_seed(path) for path in sorted(SWEEPS.glob("*.yaml"))}
    by_name = {name: points for name, (_, points) in loaded.items()}
    seeds = {name: s for name, (s, _) in loaded.items()}
    assert {"demo", "demo_quick", "sample_complexity", "depth_heads", "separation", "beyond", "paper_gpu"} <= set(by_name)

    sizes = sorted({_n(p) for p in by_name["sample_complexity"]})
    assert sizes == [2.0 ** e for e in range(8, 17)] + [math.inf]
    assert len(seeds["sample_complexity"]) >= 3
    assert len({(p.config.model.depth, p.config.model.heads, p.config.trainer.max_steps)
                for p in by_name["sample_complexity"]}) == 1  # fixed architecture and steps

    grid = {(p.config.model.depth, p.config.model.heads) for p in by_name["depth_heads"]}
    assert grid == {(L, M) for L in (1, 2, 4, 8) for M in (1, 2, 4, 8)}
    assert sorted({p.config.task.separation for p in by_name["separation"]}) == [float(d) for d in range(1, 9)]

    beyond = {(p.config.task.init, p.config.task.weights, p.config.task.noise) for p in by_name["beyond"]}
    assert ("noisy_truth", "uniform", "isotropic") in beyond  # the setting inside the theory, for comparison
    assert {"none"} <= {b[0] for b in beyond} and {"dirichlet", "range"} <= {b[1] for b in beyond}
    assert {"diagonal", "student_t"} <= {b[2] for b in beyond}

    paper = by_name["paper_gpu"]
    assert {p.config.trainer.accelerator for p in paper} == {"gpu"}
    assert min(_n(p) for p in paper) == 256 and max(_n(p) for p in paper if _n(p) < math.inf) >= 2 ** 16
    assert len(seeds["paper_gpu"]) >= 3


@pytest.mark.slow
def test_demo_quick_runs_sweep_then_report_end_to_end(tmp_path):
    """`emformer demo --quick` from a directory that is not the repository: 4 tiny real training runs through
    the local sweep backend, then the report, whose checks come from those runs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "emformer", "demo", "--quick"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report_md = Path("demo-quick") / "report" / "report.md"
    assert f"report: {report_md}" in done.stdout
    assert "verdict" in done.stdout and "err against depth L" in done.stdout
    verdicts = [line for line in done.stdout.splitlines() if line.startswith("  ") and "[1 seed" in line]
    assert verdicts and all("indicative only, below the study's bar of ≥ 5 seeds" in v for v in verdicts)
    assert "docs/study/report.md" in done.stdout
    assert "on its test set (eval.test_seed = 1000000001" in done.stdout  # the summary is on the test set
    text = (tmp_path / report_md).read_text()
    assert "## Sample complexity" in text and "States: 4 done." in text
    assert "Family: " in text and "L at N=∞" in text
    for figure in ("curves.png", "sample_complexity.png", "depth_heads.png"):
        assert (tmp_path / "demo-quick" / "report" / figure).stat().st_size > 10_000
    # the best run is exported as a ready-to-use clusterer
    model = tmp_path / "demo-quick" / "model"
    assert f"exported the run with the lowest val err to {Path('demo-quick') / 'model'}" in done.stdout
    assert (model / "model.safetensors").is_file() and (model / "config.json").is_file()
