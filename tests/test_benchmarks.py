"""Smoke tests of benchmarks/: the scripts run at tiny sizes and produce their tables (not speed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import common  # noqa: E402


def test_markdown_table_and_numbers():
    table = common.markdown_table(["method", "err"], [["EM", 0.012345], ["model", None]])
    lines = table.splitlines()
    assert lines[0] == "| method | err |"
    assert lines[1] == "| :--- | ---: |"
    assert lines[2] == "| EM | 0.0123 |" and lines[3] == "| model | — |"
    assert common.fmt(1234567.8) == "1,234,568" and common.fmt(12) == "12" and common.fmt(2.5e-5) == "2.50e-05"
    with pytest.raises(ValueError, match="cells"):
        common.markdown_table(["a", "b"], [["only one"]])


def test_write_report_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    common.write_report(path, "# old")
    common.write_report(path, "# new")
    assert path.read_text() == "# new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["BENCHMARKS.md"]  # no temporary file left behind


def test_machine_info_names_the_gpu_or_says_none():
    info = common.machine_info()
    text = common.machine_markdown(info, load_end=0.0)
    assert info["cpus_usable"] == len(os.sched_getaffinity(0)) <= info["cpus_total"]
    assert (info["gpu"] or common.NO_GPU) in text


@pytest.fixture(scope="module")
def reference_task_export(tmp_path_factory):
    """A randomly initialised model of the reference task, exported (the scripts, not the figures)."""
    from export_fixtures import make_fake_run

    from emformer.train.export.command import export_run

    root = tmp_path_factory.mktemp("bench")
    run_dir = make_fake_run(root / "run", ("task=k3_d8", "model=tiny"))
    return export_run(run_dir, root / "export")


def test_run_all_quick_writes_inference_and_quality_tables(reference_task_export, tmp_path):
    import run_all

    out = tmp_path / "B.md"
    assert run_all.main(["--quick", "--sections", "inference,quality", "--export", str(reference_task_export),
                         "--out", str(out), "--skip-memory"]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks") and "--quick run" in text
    assert "## Inference" in text and "## Clustering quality" in text and "## Training" not in text
    assert "sklearn KMeans per episode" in text and "oracle" in text and "Student-t" in text
    figures = json.loads((tmp_path / "B.json").read_text())["figures"]
    import bench_quality

    grid = figures["quality"]["grid"]
    assert len(grid) == len(bench_quality.QUICK["separations"]) * len(bench_quality.QUICK["ns"])
    for cell in grid.values():
        for method in bench_quality.METHODS:
            assert 0.0 <= cell[method] <= 1.0
    methods = figures["inference"]["methods"]
    assert methods[0]["x_model"] == 1.0 and all(m["seconds"] > 0 for m in methods)
    assert all(0.0 <= m["err"] <= 1.0 for m in methods)


def test_memory_probe_reports_bytes(reference_task_export):
    import bench_inference

    peaks = iter([100 << 20, (100 << 20) + 4 * 250_000])  # the high-water mark before and after the batch
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_inference, "_maxrss_bytes", lambda: next(peaks))
        result = bench_inference.memory_probe("em", reference_task_export, count=4, n=32)
    assert result == {"method": "em", "episodes": 4, "bytes_per_episode": 250_000}


def test_em_restarts_pick_the_likeliest_fit():
    import torch

    import bench_quality
    from emformer.data import inits
    from emformer.data.episodes import sample_episodes
    from emformer.data.tasks import TaskSpec
    from emformer.models import baselines

    batch = sample_episodes(TaskSpec(k=3, d=2, n=40, separation=3.0), 5, range(6))
    pred = bench_quality.em_with_restarts(batch, 3)
    assert pred.shape == batch["labels"].shape
    # The kept labels are those of the likeliest restart, episode by episode, each restart run on its own.
    lls, preds = [], []
    for stream in range(1, 4):
        init = inits.kmeans_plus_plus(batch["points"], batch["mask"], batch["kmask"],
                                      baselines.episode_uniforms(batch, 3, stream))
        fit = baselines.em(batch["points"], batch["mask"], batch["kmask"], init, bench_quality.EM_ITERS)
        lls.append(bench_quality.spherical_log_likelihood(batch["points"], batch["mask"], batch["kmask"], fit))
        preds.append(fit.log_resp.argmax(-1))
    best = torch.stack(lls).argmax(0)
    assert torch.isfinite(torch.stack(lls)).all()
    assert torch.equal(pred, torch.stack(preds)[best, torch.arange(6)])


@pytest.mark.slow
def test_training_benchmark_measures_a_real_run():
    import bench_train

    result = bench_train.measure("debug", warmup=2, steps=2, threads=1, extra=("trainer.accelerator=cpu",))
    assert result["episodes_per_step"] == 32  # configs/debug.yaml: batch 32, one process
    assert result["episodes_per_s"] > 0 and result["tokens_per_s"] == pytest.approx(result["episodes_per_s"] * 34, rel=1e-6)


# ------------------------------------------------------------------------------------------ gpu_check
def _counted_flops(model, n: int, k: int, backward: bool) -> int:
    """What torch's FlopCounterMode counts for one episode (SDPA's math backend, so attention is counted too)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    points, init = torch.randn(1, n, model.cfg.d_in), torch.randn(1, k, model.cfg.d_in)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits, centroids = model.forward_with_centroids(points, None, init, None)
        if backward:
            (logits.logsumexp(-1).sum() + (0 if centroids is None else centroids.sum())).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("overrides", [{}, {"centroid_head": True}, {"learned_centroids": True, "depth": 3}])
def test_model_flops_per_token_match_torchs_flop_counter(overrides):
    import gpu_check
    from emformer.models.transformer import ClusterTransformer, TransformerConfig

    cfg = TransformerConfig(**{"d_in": 5, "k_max": 3, "depth": 2, "heads": 2, "width": 16, "mlp_ratio": 3,
                               **overrides})
    model = ClusterTransformer(cfg)
    n, k = 11, 3
    forward = gpu_check.forward_flops_per_episode(cfg, n, k)
    assert forward == _counted_flops(model, n, k, backward=False)
    # Training = 3 x forward: exact but for the embedding's input gradient, which nothing needs.
    both = _counted_flops(model, n, k, backward=True)
    assert 0.97 * 3 * forward <= both <= 3 * forward
    assert gpu_check.training_flops_per_token(cfg, n, k) == pytest.approx(3 * forward / (n + k))


def test_peak_flops_by_device_name():
    import gpu_check

    assert gpu_check.peak_flops("NVIDIA H200", "bf16-mixed") == 989e12
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3", "32") == 67e12
    assert gpu_check.peak_flops("NVIDIA H100 PCIe", "bf16-mixed") == 756e12
    assert gpu_check.peak_flops("NVIDIA A100-SXM4-80GB", "bf16-mixed") == 312e12
    assert gpu_check.peak_flops("NVIDIA L40S", "32") == 91.6e12 and gpu_check.peak_flops("NVIDIA L4", "32") == 30.3e12
    assert gpu_check.peak_flops("NVIDIA GH200 480GB", "bf16-mixed") == 989e12
    assert gpu_check.peak_flops("Tesla V100-SXM2-16GB", "bf16-mixed") is None  # no bf16 on Volta
    assert gpu_check.peak_flops("Some Future GPU", "32") is None


def test_kept_sections_are_replaced_or_appended():
    begin, end = common.section_markers(common.GPU_SECTION)
    section = f"{begin}\n## GPU proof\nnew\n{end}"
    text = f"# Benchmarks\n\nCPU tables\n\n{begin}\nold\n{end}\n\n## After\n"
    replaced = common.replace_section(text, common.GPU_SECTION, section)
    assert replaced == text.replace(f"{begin}\nold\n{end}", section)
    assert common.kept_sections(replaced) == {common.GPU_SECTION: section}
    appended = common.replace_section("# Benchmarks\n", common.GPU_SECTION, section)
    assert appended == f"# Benchmarks\n\n{section}\n" and common.kept_sections("# Benchmarks\n") == {}
    # a block's end marker must carry its own name: another block's end does not close it
    hand = "<!-- by-hand:begin -->\nmeasured once\n<!-- by-hand:end -->"
    assert list(common.kept_sections(f"{hand}\n{section}")) == ["by-hand", common.GPU_SECTION]
    assert common.kept_sections("<!-- a:begin -->\nx\n<!-- b:end -->") == {}


def test_run_all_carries_every_kept_section_over(tmp_path, monkeypatch):
    """`make bench` rewrites BENCHMARKS.md from what it measures and keeps the blocks it cannot measure."""
    import run_all

    hand = "<!-- by-hand:begin -->\n## Measured by hand\nagainst an old commit\n<!-- by-hand:end -->"
    begin, end = common.section_markers(common.GPU_SECTION)
    gpu = f"{begin}\n## GPU proof\nrows\n{end}"
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(f"# Benchmarks\n\nold tables\n\n{hand}\n\n{gpu}\n")
    monkeypatch.setattr(run_all, "run_sections", lambda *a, **k: ({}, {}, {"data": 0.0}, None))
    monkeypatch.setattr(run_all, "save_json", lambda *a, **k: None)
    assert run_all.main(["--sections", "data", "--out", str(out)]) == 0
    text = out.read_text()
    assert "old tables" not in text and hand in text and gpu in text
    # the header claims its machine for the sections it measured, not for every figure in the file
    assert "The figures of the sections it measured (data) were measured in that run" in text


def test_gpu_check_without_a_gpu_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path / "B.md")],
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no CUDA device" in result.stderr and "--cpu" in result.stderr
    assert not (tmp_path / "B.md").exists()


@pytest.mark.slow
def test_gpu_check_cpu_bf16_path_runs_every_row_and_writes_its_section(tmp_path):
    """The whole GPU script on its CPU path at tiny sizes with --bf16: every training row the GPU runs (fp32,
    bf16-mixed, 1-process DDP, DeepSpeed ZeRO-2 in bf16-mixed), the export, the Clusterer row, the table
    between the markers (the rest of the file untouched); the flash row says why it is skipped."""
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nCPU tables stay.\n")
    result = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", "--bf16", "--out", str(out), "--json"],
                            env={**os.environ, "PYTHON": sys.executable, "WANDB_MODE": "disabled"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "flash-attention row is skipped: it checks SDPA's CUDA flash kernel (needs a GPU)" in result.stderr
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nCPU tables stay.\n")
    section = common.kept_sections(text).get(common.GPU_SECTION)
    assert section and "--cpu path check" in section and "gpu_check.sh --cpu --bf16" in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| run", "| :"))]
    labels = [row.split(" | ")[0][2:] for row in rows]
    assert labels == ["fp32", "bf16-mixed", "DDP, 1 process (gloo), bf16-mixed", "DeepSpeed ZeRO-2, bf16-mixed",
                      "Clusterer.predict_proba_batch, fp32, chunks of 16"]
    figures = json.loads(result.stdout[result.stdout.index("\n{") + 1:])
    assert all(r["episodes_per_s"] > 0 and r["tokens_per_s"] > 0 and r["model_flops_per_s"] > 0
               for r in figures["rows"])


def test_gpu_check_cpu_bf16_runs_the_gpu_rows_precisions():
    import gpu_check

    gpu, cpu = gpu_check.train_runs(cpu=False), gpu_check.train_runs(cpu=True, bf16=True)
    assert [precision for _, precision, _ in cpu] == [precision for _, precision, _ in gpu]
    assert [overrides[1:] for _, _, overrides in cpu] == [overrides[1:] for _, _, overrides in gpu]
    assert [precision for _, precision, _ in gpu_check.train_runs(cpu=True)] == ["32", "32", "32"]


def test_gpu_check_text_states_no_sampler_figure():
    """The sampler's rate lives in BENCHMARKS.md's data section, which a command measures."""
    import re

    import gpu_check

    assert "BENCHMARKS.md" in gpu_check.WHY_SMALL_STEPS
    assert not re.search(r"\d+k? episodes/s", gpu_check.WHY_SMALL_STEPS)


def test_pretrained_bench_section_rewrite_and_paired_verdicts(tmp_path):
    import numpy as np

    import bench_pretrained

    assert bench_pretrained.paired(np.array([0.1, 0.12, 0.11, 0.09]))[2] == "LOSES"
    assert bench_pretrained.paired(np.array([-0.1, -0.12, -0.11, -0.09]))[2] == "BEATS"
    assert bench_pretrained.paired(np.array([0.1, -0.1, 0.05, -0.05]))[2] == "TIE"
    # the ECE's interval brackets it and narrows with the episodes: calibrated at 0.7 by construction
    rng = np.random.default_rng(0)
    widths = []
    for count in (100, 1600):
        confidence = np.full(count, 0.7)
        correct = (rng.random(count) < 0.7).astype(float)
        lo, hi = bench_pretrained.ece_interval(confidence, correct)
        ece = bench_pretrained.expected_calibration_error(confidence, correct)
        assert lo <= ece <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Data\n\nold data\n")
    title = bench_pretrained.SECTION_TITLE
    bench_pretrained.replace_section(path, title, f"{title}\n\nfirst\n")
    bench_pretrained.replace_section(path, title, f"{title}\n\nsecond\n")
    text = path.read_text()
    assert text.count(title) == 1 and "second" in text and "first" not in text and "old data" in text
    path.write_text(text + "\n## Later\n\nkept\n")
    bench_pretrained.replace_section(path, title, f"{title}\n\nthird\n")
    assert "kept" in path.read_text() and "third" in path.read_text() and "second" not in path.read_text()
    # a hand-measured block right after the section keeps its begin marker
    block = "<!-- by-hand:begin -->\n## By hand\n\nmeasured\n<!-- by-hand:end -->\n"
    path.write_text(path.read_text().replace("\n## Later", "\n" + block + "\n## Later"))
    bench_pretrained.replace_section(path, title, f"{title}\n\nfourth\n")
    assert block in path.read_text() and "fourth" in path.read_text() and "third" not in path.read_text()


@pytest.mark.slow
def test_pretrained_bench_runs_at_tiny_sizes():
    import bench_pretrained

    figures, text = bench_pretrained.run(quick=True)  # as --write: the section names the machine it ran on
    assert set(figures) == {"curve", "share", "unknown_k", "polish", "table"} and text.startswith(bench_pretrained.SECTION_TITLE)
    header = text[:text.index("### ")]
    assert "bench_pretrained.py --model emformer-gmm-small --quick" in header and "- CPU: " in header
    assert "- code: git " in header and "load average" in header
    share = figures["share"]
    assert share["per_k"]["all"]["episodes"] == share["episodes"] and str(share["passes"]) in share["by_passes"]
    assert all(row["verdict_em_10"] in ("BEATS", "TIE", "LOSES") for row in share["per_k"].values())
    assert 0 <= figures["unknown_k"]["emformer auto k: P(k | X)"]["k_accuracy"] <= 1
    assert all(0 <= figures["unknown_k"][method]["ece_if_calibrated"] < 1 for method in bench_pretrained.K_METHODS)
    assert set(figures["unknown_k"]["make_blobs"]) == set(bench_pretrained.K_METHODS)
    assert figures["table"]["digits (PCA 16) k=10"]["ari"]["emformer"] is None  # k above the model's slots
    assert all(row["ari"]["KMeans n_init=10"] is not None for row in figures["table"].values())


def test_bench_data_quick_measures_every_row_and_the_sampling_windows():
    import bench_data

    result = bench_data.run(quick=True)
    figures, names = result["figures"], [r["name"] for r in result["rows"]]
    assert "generate, in-process (1 core)" in names and "read shards, finite sequential, in-process" in names
    assert figures["sampling_windows"] == 3
    assert 0 < figures["sampling_eps_per_cpu_s_median"] <= figures["sampling_eps_per_cpu_s_best"]
    assert f"best {figures['sampling_eps_per_cpu_s_best']:,.0f} episodes per CPU-second" in result["markdown"]
    assert figures["index_per_batch_N1024_us"] > 0 and figures["index_per_batch_N1048576_us"] > 0


def test_sections_not_run_are_carried_over_with_their_remarks():
    """run_all --sections data: the other sections of the committed BENCHMARKS.md stay as they were, with
    their remark bullets; the hand-measured blocks are left to the kept-block mechanism."""
    import run_all

    text = (common.REPO / "BENCHMARKS.md").read_text()
    blocks, remarks = run_all.previous_sections(text, ["train", "quality"])
    assert set(blocks) == {"train", "quality"}
    assert blocks["train"].startswith("## " + run_all.SECTION_TITLES["train"] + "\n")
    assert "## Inference" not in blocks["train"] and "data-by-hand" not in blocks["quality"]
    assert remarks and all(r.startswith(("Training", "Quality")) for r in remarks)
    out = run_all.report({}, {"data": "| data table |"}, {"data": 1.0}, common.machine_info(), None, None, False,
                         "cmd", blocks, remarks)
    assert out.index("| data table |") < out.index(blocks["train"]) < out.index(blocks["quality"])
    assert "carried over as they were from the previous report" in out and f"- {remarks[0]}" in out
