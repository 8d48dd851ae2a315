"""Training throughput: episodes/s and tokens/s per optimizer step, measured through `emformer train` itself.

Each measurement is a real `emformer train` run in a subprocess (a temporary run directory, wandb off):
`warmup + steps` steps with a train row every `warmup` steps, evaluation and checkpoints only at the start
and the end. The run's own metrics rows time each window of steps excluding evaluation and
checkpointing, so the figure is what a user's run reports; the first window (start-up, allocator warm-up,
first DataLoader batch) is dropped. Rows:

  - debug and reference configs, one process with 1 thread and with every usable core;
  - the reference config with trainer.compile=true (1 thread), against the eager 1-thread row;
  - DDP with 2 processes x 1 thread on CPU (gloo) for the reference config, against 2x the 1-thread rate:
    scaling efficiency = episodes/s(2 processes) / (2 x episodes/s(1 process, 1 thread));
  - on a GPU (when torch sees one): fp32, bf16-mixed and DeepSpeed ZeRO-2; otherwise the rows say so.

    python benchmarks/bench_train.py [--quick] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from emformer.train import rundir  # noqa: E402
from common import (NO_GPU, emformer_command, fmt, gpu_description, markdown_table, progress,  # noqa: E402
                    run_checked, subprocess_env, usable_cpus)

CONFIGS = {"debug": "configs/debug.yaml", "reference": "configs/reference.yaml"}
FULL = {"warmup": 10, "steps": 60}
QUICK = {"warmup": 2, "steps": 4}
# Evaluation is excluded from the timed windows, but it still runs at step 0 and at the end: keep it small.
EVAL_EPISODES = 64


def measure(config: str, warmup: int, steps: int, threads: int, devices: int = 1,
            extra: tuple[str, ...] = (), timeout: float = 900, keep: Optional[Path] = None) -> dict[str, Any]:
    """One `emformer train` run; throughput over the windows after the first `warmup` steps.
    `keep`: train in this run directory and leave it there (e.g. to export the model), else a temporary one."""
    if steps % warmup:
        raise ValueError(f"steps ({steps}) must be a multiple of warmup ({warmup}): one train row per window")
    workdir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        run_dir = keep or workdir / "run"
        never = 10 ** 9
        command = emformer_command(
            "train", CONFIGS[config], f"trainer.max_steps={warmup + steps}", f"trainer.log_every={warmup}",
            f"trainer.val_every={never}", f"trainer.ckpt_every={never}", f"eval.episodes={EVAL_EPISODES}",
            f"trainer.threads={threads}", f"trainer.devices={devices}", "trainer.progress=false",
            "wandb.mode=disabled", *extra, "--run-dir", str(run_dir))
        start = time.perf_counter()
        run_checked(command, f"training benchmark ({config})", timeout, env=subprocess_env(threads))
        wall = time.perf_counter() - start
        rows = rundir.read_metrics(run_dir)
        config_used = rundir.config_path(run_dir).read_text()
        params = rundir.read_meta(run_dir).get("param_count")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    windows = [r for r in rows if r.get("split") == "train" and r["step"] > warmup]
    if len(windows) != steps // warmup:
        raise RuntimeError(f"training benchmark ({config}): expected {steps // warmup} timed windows, got "
                           f"{len(windows)} (rows: {rows})")
    seconds = sum(r["s_per_step"] * warmup for r in windows)
    per_episode_tokens = windows[0]["tokens_per_s"] / windows[0]["episodes_per_s"]
    episodes = windows[0]["episodes_per_s"] * windows[0]["s_per_step"]  # per step, all ranks
    rates = [r["episodes_per_s"] for r in windows]
    import yaml

    batch = int(yaml.safe_load(config_used)["data"]["batch_size"])
    peaks = [r["peak_memory_gib"] for r in windows if r.get("peak_memory_gib") is not None]
    return {
        "config": config, "threads": threads, "devices": devices, "extra": list(extra), "steps": steps,
        "batch_per_rank": batch, "episodes_per_step": round(episodes),
        "s_per_step": seconds / steps, "episodes_per_s": steps * episodes / seconds,
        "tokens_per_s": steps * episodes * per_episode_tokens / seconds,
        "episodes_per_s_min": min(rates), "episodes_per_s_max": max(rates), "process_wall_s": wall,
        "parameters": params, "peak_memory_gib": max(peaks) if peaks else None,
    }


def run(quick: bool = False) -> tuple[dict[str, Any], str]:
    sizes = QUICK if quick else FULL
    cores = usable_cpus()
    figures: dict[str, Any] = {"cpu": [], "ddp": None, "gpu": None, "sizes": sizes}
    cpu_rows = []
    for config in CONFIGS:
        for threads in sorted({1, cores}):
            progress(f"train: {config}, 1 process x {threads} thread(s), {sizes['warmup']}+{sizes['steps']} steps")
            result = measure(config, sizes["warmup"], sizes["steps"], threads, extra=("trainer.accelerator=cpu",))
            figures["cpu"].append(result)
            cpu_rows.append([f"{config}", f"1 x {threads} thread(s)", result["episodes_per_step"],
                             result["s_per_step"] * 1000, result["episodes_per_s"], result["tokens_per_s"],
                             f"{fmt(result['episodes_per_s_min'])}–{fmt(result['episodes_per_s_max'])}"])

    one = next(r for r in figures["cpu"] if r["config"] == "reference" and r["threads"] == 1)
    progress(f"train: reference, trainer.compile=true, 1 process x 1 thread, {sizes['warmup']}+{sizes['steps']} steps")
    compiled = measure("reference", sizes["warmup"], sizes["steps"], 1,
                       extra=("trainer.accelerator=cpu", "trainer.compile=true"))
    compiled["speedup"] = compiled["episodes_per_s"] / one["episodes_per_s"]
    figures["compiled"] = compiled
    cpu_rows.append(["reference, trainer.compile=true", "1 x 1 thread(s)", compiled["episodes_per_step"],
                     compiled["s_per_step"] * 1000, compiled["episodes_per_s"], compiled["tokens_per_s"],
                     f"{fmt(compiled['episodes_per_s_min'])}–{fmt(compiled['episodes_per_s_max'])}"])
    if cores >= 2:
        progress(f"train: reference, DDP 2 processes x 1 thread (gloo), {sizes['warmup']}+{sizes['steps']} steps")
        ddp = measure("reference", sizes["warmup"], sizes["steps"], 1, devices=2,
                      extra=("trainer.accelerator=cpu", "strategy=ddp"))
        ddp["efficiency"] = ddp["episodes_per_s"] / (2 * one["episodes_per_s"])
        figures["ddp"] = ddp
        cpu_rows.append(["reference", "DDP 2 x 1 thread", ddp["episodes_per_step"], ddp["s_per_step"] * 1000,
                         ddp["episodes_per_s"], ddp["tokens_per_s"],
                         f"{fmt(ddp['episodes_per_s_min'])}–{fmt(ddp['episodes_per_s_max'])}"])

    header = ["config", "processes x threads", "episodes/step", "ms/step", "episodes/s", "tokens/s",
              "episodes/s range over windows"]
    lines = [markdown_table(header, cpu_rows)]
    remarks = []
    if figures["ddp"] is not None:
        eff = figures["ddp"]["efficiency"]
        lines.append(f"\nDDP scaling efficiency on CPU (reference, 2 processes x 1 thread vs 2 x one 1-thread "
                     f"process): **{eff:.0%}**.")
        if eff < 0.8:
            remarks.append(
                f"DDP on CPU scales at {eff:.0%}: the two ranks share {cores} core(s) with their own episode "
                f"generation (done in the training process, data.num_workers=0) and all-reduce "
                f"{figures['ddp']['parameters']:,} gradients over gloo every step, and a busy machine lowers it "
                "further. (GPU scaling with NCCL is not measured here.)")
    for config in CONFIGS:
        rates = {r["threads"]: r["episodes_per_s"] for r in figures["cpu"] if r["config"] == config}
        if cores > 1 and rates.get(cores, float("inf")) < rates[1]:
            remarks.append(
                f"Training ({config}): {cores} threads ran {rates[1] / rates[cores]:.1f}x slower than 1 thread. "
                "Each step is many small ops; when the cores are shared, OpenMP threads likely spin-wait on "
                "each other at every op. On a shared or busy node set trainer.threads=1 (and use more processes).")
    speedup = figures["compiled"]["speedup"]
    lines.append(f"\ntorch.compile (trainer.compile=true) on CPU, reference, 1 thread: **{speedup:.2f}x** the eager "
                 f"step (compilation, in the first {sizes['warmup']} steps, not timed); "
                 f"{'it pays' if speedup > 1.05 else 'it does not pay here, so it stays off by default'}.")
    if figures["ddp"] is None:
        lines.append(f"\nDDP scaling: not measured (this machine has {cores} usable core; 2 are needed).")

    gpu = gpu_description()
    if gpu is None:
        lines.append(f"\nGPU (fp32, bf16-mixed, DeepSpeed ZeRO-2): {NO_GPU}; no GPU figure is given.")
    else:
        gpu_rows = []
        figures["gpu"] = []
        for label, extra in (("fp32", ("trainer.precision=32",)), ("bf16-mixed", ("trainer.precision=bf16-mixed",)),
                             ("bf16-mixed, DeepSpeed ZeRO-2", ("trainer.precision=bf16-mixed",
                                                               "strategy=deepspeed_zero2"))):
            progress(f"train: reference on {gpu}, {label}")
            result = measure("reference", sizes["warmup"], sizes["steps"], cores,
                             extra=("trainer.accelerator=gpu", *extra))
            result["label"] = label
            figures["gpu"].append(result)
            gpu_rows.append([label, result["s_per_step"] * 1000, result["episodes_per_s"], result["tokens_per_s"]])
        lines.append(f"\nOn {gpu} (reference config, 1 GPU):\n")
        lines.append(markdown_table(["precision / strategy", "ms/step", "episodes/s", "tokens/s"], gpu_rows))
    figures["remarks"] = remarks
    return figures, "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps only: checks the script, not the speed")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of the table")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    figures, table = run(args.quick)
    print(json.dumps(figures, indent=2) if args.json else table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
