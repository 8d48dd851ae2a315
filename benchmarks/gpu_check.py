"""GPU proof: the reference config trained on one GPU, and the Clusterer batched API on cuda, in <= 10 minutes.

Runs, each a real `emformer train configs/reference.yaml` (benchmarks/bench_train.py:measure) for
`warmup + steps` steps, timed over the windows after the first:

  - fp32 (trainer.precision=32);
  - bf16-mixed;
  - DDP with one process over NCCL (strategy.single_process_ddp=true: the DDP wrapper and a process group);
  - DeepSpeed ZeRO-2, bf16-mixed;

then the fp32 run is exported and `Clusterer.predict_proba_batch` labels a batch of reference episodes on cuda,
and the exported model's forward runs under bf16 autocast with SDPA forced to its flash kernel
(`sdpa_kernel(SDPBackend.FLASH_ATTENTION)`): torch raises when flash cannot take the attention (a mask, a
dtype, a head size), so a GPU run fails loudly where the fast kernel would silently be lost.
Each row gives ms/step, episodes/s, tokens/s, peak device memory (torch.cuda.max_memory_allocated) and the
model FLOPs utilisation: tokens/s x training FLOPs per token (3 x forward, counted from the architecture by
`forward_flops_per_episode`) over the GPU's dense peak for the precision (PEAK_TFLOPS, by device name).
The table goes to stdout and, between its gpu_check markers (common.kept_sections), into BENCHMARKS.md (atomically).

`--cpu` runs the same path on CPU at tiny sizes (DDP over gloo; ZeRO-2 on a CPU rank): it checks the script,
it measures nothing, and writes BENCHMARKS.md only when --out is given. With `--bf16` its mixed-precision rows
run bf16-mixed as on a GPU (CPU autocast, the same precision code; fp32 without it); the flash row checks the
CUDA kernel and is skipped on CPU with a printed reason.

    benchmarks/gpu_check.sh [--cpu [--bf16]] [--out PATH] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inference import episodes, model_method, task_for  # noqa: E402
from bench_train import measure  # noqa: E402
from common import (GPU_SECTION, REPO, emformer_command, markdown_table, progress,  # noqa: E402
                    replace_section, run_checked, section_markers, time_call, usable_cpus, write_report)

from emformer.models.transformer import TransformerConfig  # noqa: E402

CONFIG = "configs/reference.yaml"
# warmup + steps = 300 training steps per run; 4 runs, start-up and evaluation included, fit in 10 minutes.
GPU_SIZES = {"warmup": 50, "steps": 250, "episodes": 8192, "chunk": 1024, "overrides": ("data.num_workers=4",)}
CPU_SIZES = {"warmup": 2, "steps": 2, "episodes": 32, "chunk": 16,
             "overrides": ("data.batch_size=8", "task.n=32", "model.depth=1")}
# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets: bf16 on tensor cores, and fp32 without
# tensor cores (torch's default float32 matmul precision, "highest", does not use TF32). First match of the
# name as torch.cuda.get_device_name spells it wins, so the longer names come first.
PEAK_TFLOPS: tuple[tuple[str, Optional[float], float], ...] = (
    ("GH200", 989.0, 67.0),
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),
    ("H800", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("A10G", 70.0, 31.2),
    ("A10", 125.0, 31.2),
    ("RTX 4090", 165.0, 82.6),
    ("RTX 3090", 71.0, 35.6),
    ("V100", None, 15.7),
    ("T4", None, 8.1),
)


# ------------------------------------------------------------------------------------------ model FLOPs
def forward_flops_per_episode(cfg: TransformerConfig, n: int, k: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one ClusterTransformer forward pass over n points and k centroids.

    T = n + k tokens of width D, L blocks, MLP ratio r, input dimension d:
      per block  qkv 6·T·D² + output projection 2·T·D² + scores Q·Kᵀ and weights·V 4·T²·D + MLP 4·r·T·D²;
      embedding  2·T·d·D (points and init centroids; learned slots skip it for the k centroids);
      read-out   W_q on points 2·n·D², W_k on centroids 2·k·D², logits 2·n·k·D, centroid head 2·k·D·d.
    LayerNorm, softmax, GELU and bias adds are left out, as in the usual MFU convention.
    """
    D, L, r, d, T = cfg.width, cfg.depth, cfg.mlp_ratio, cfg.d_in, n + k
    blocks = L * (8 * T * D * D + 4 * T * T * D + 4 * r * T * D * D)
    embedded = n if cfg.learned_centroids else T
    readout = 2 * n * D * D + 2 * k * D * D + 2 * n * k * D + (2 * k * D * d if cfg.centroid_head else 0)
    return blocks + 2 * embedded * d * D + readout


def training_flops_per_token(cfg: TransformerConfig, n: int, k: int) -> float:
    """Forward + backward ≈ 3 x forward (the backward pass multiplies twice: by the weights and by the inputs)."""
    return 3 * forward_flops_per_episode(cfg, n, k) / (n + k)


def peak_flops(device_name: str, precision: str) -> Optional[float]:
    """The GPU's dense peak in FLOP/s for `precision` ("32" or a bf16 one), None when the GPU is not in the
    table (or has no bf16)."""
    for name, bf16, fp32 in PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            tflops = fp32 if precision == "32" else bf16
            return None if tflops is None else tflops * 1e12
    return None


# ------------------------------------------------------------------------------------------ the runs
def train_runs(cpu: bool, bf16: bool = False) -> list[tuple[str, str, tuple[str, ...]]]:
    """(label, precision, overrides) of each training run: on a GPU, or on CPU with `bf16`, every row the GPU
    check has; on CPU without it, the mixed-precision rows in fp32 and no bf16-mixed row."""
    accel = "trainer.accelerator=cpu" if cpu else "trainer.accelerator=gpu"
    runs = [("fp32", "32", (accel, "trainer.precision=32"))]
    mixed = "bf16-mixed" if bf16 or not cpu else "32"
    if mixed != "32":
        runs.append(("bf16-mixed", mixed, (accel, f"trainer.precision={mixed}")))
    name = "fp32" if mixed == "32" else mixed
    runs.append((f"DDP, 1 process ({'gloo' if cpu else 'NCCL'}), {name}", mixed,
                 (accel, f"trainer.precision={mixed}", "strategy=ddp", "strategy.single_process_ddp=true")))
    runs.append((f"DeepSpeed ZeRO-2, {name}", mixed, (accel, f"trainer.precision={mixed}", "strategy=deepspeed_zero2")))
    return runs


def architecture(overrides: tuple[str, ...]) -> tuple[TransformerConfig, int, int]:
    """The model config and padded (n, k) of the reference config under `overrides`."""
    from emformer.train.config import load_config, to_run_config

    run = to_run_config(load_config(REPO / CONFIG, list(overrides)))
    return TransformerConfig.from_task_and_model(run.task, run.model), run.task.n_pad, run.task.k_pad


def utilisation(tokens_per_s: float, flops_per_token: float, peak: Optional[float]) -> tuple[float, Optional[float]]:
    achieved = tokens_per_s * flops_per_token
    return achieved, (achieved / peak if peak else None)


def clusterer_row(export_dir: Path, device: str, sizes: dict[str, Any]) -> dict[str, Any]:
    """Clusterer.predict_proba_batch on `episodes` reference episodes (given init, chunks of `chunk`)."""
    spec = task_for(export_dir, n=int(json.loads((export_dir / "config.json").read_text())["task"]["n"]))
    batch = {key: value.to(device) for key, value in episodes(spec, int(sizes["episodes"])).items()}
    run = model_method(export_dir, int(sizes["chunk"]), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timing = time_call(lambda: run(batch).sum().item(), repeats=3)  # .item(): wait for the device
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
    count = batch["points"].shape[0]
    return {"seconds": timing.best, "episodes_per_s": count / timing.best,
            "tokens_per_s": count * (spec.n_pad + spec.k_pad) / timing.best, "peak_memory_gib": peak,
            "n": spec.n_pad, "k": spec.k_pad}


def flash_row(export_dir: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    """The exported model's forward on cuda under bf16 autocast with SDPA allowed its flash kernel only (a
    fixed-size task: no attention mask), so torch raises if flash cannot run it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from emformer.models.clusterer import Clusterer

    spec = task_for(export_dir, n=int(json.loads((export_dir / "config.json").read_text())["task"]["n"]))
    batch = {key: value.to("cuda") for key, value in episodes(spec, int(sizes["chunk"])).items()}
    model = Clusterer.from_pretrained(export_dir, device="cuda", standardize=False).model

    def forward() -> float:
        with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
            return model(batch["points"], None, batch["init"], None).float().sum().item()  # .item(): wait

    torch.cuda.reset_peak_memory_stats()
    timing = time_call(forward, repeats=3)
    count = batch["points"].shape[0]
    return {"seconds": timing.best, "episodes_per_s": count / timing.best,
            "tokens_per_s": count * (spec.n_pad + spec.k_pad) / timing.best,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30, "n": spec.n_pad, "k": spec.k_pad}


def run(cpu: bool, bf16: bool = False) -> dict[str, Any]:
    sizes = CPU_SIZES if cpu else GPU_SIZES
    device = "cpu" if cpu else "cuda"
    name = "CPU (--cpu path check)" if cpu else torch.cuda.get_device_name(0)
    threads = 1 if cpu else usable_cpus()
    figures: dict[str, Any] = {"device": name, "cpu": cpu, "sizes": {k: v for k, v in sizes.items()}, "rows": []}
    overrides = tuple(sizes["overrides"])
    cfg, n, k = architecture(overrides)
    per_token = training_flops_per_token(cfg, n, k)
    figures["flops"] = {"forward_per_episode": forward_flops_per_episode(cfg, n, k), "training_per_token": per_token,
                        "n": n, "k": k, "depth": cfg.depth, "width": cfg.width}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        kept = Path(tmp) / "run"
        for index, (label, precision, extra) in enumerate(train_runs(cpu, bf16)):
            progress(f"gpu_check: {label}, {sizes['warmup']}+{sizes['steps']} steps on {name}")
            result = measure("reference", sizes["warmup"], sizes["steps"], threads, extra=(*extra, *overrides),
                             timeout=300, keep=kept if index == 0 else None)
            achieved, mfu = utilisation(result["tokens_per_s"], per_token, None if cpu else peak_flops(name, precision))
            figures["rows"].append({"label": label, "kind": "train", "precision": precision, **result,
                                    "model_flops_per_s": achieved, "mfu": mfu})
        progress(f"gpu_check: Clusterer.predict_proba_batch on {device}")
        export_dir = Path(tmp) / "export"
        run_checked(emformer_command("export", str(kept), "--out", str(export_dir)), "export", timeout=300)
        row = clusterer_row(export_dir, device, sizes)
        forward_per_token = forward_flops_per_episode(cfg, row["n"], row["k"]) / (row["n"] + row["k"])
        achieved, mfu = utilisation(row["tokens_per_s"], forward_per_token, None if cpu else peak_flops(name, "32"))
        figures["rows"].append({"label": f"Clusterer.predict_proba_batch, fp32, chunks of {sizes['chunk']}",
                                "kind": "inference", "precision": "32", **row, "model_flops_per_s": achieved,
                                "mfu": mfu})
        if cpu:
            # torch's CPU flash kernel is another implementation (it takes boolean masks, which the CUDA one
            # refuses): forcing it here would prove nothing about the GPU path.
            progress("gpu_check: the flash-attention row is skipped: it checks SDPA's CUDA flash kernel "
                     "(needs a GPU)")
        else:
            progress("gpu_check: forward with SDPA forced to its flash kernel, bf16 autocast")
            row = flash_row(export_dir, sizes)
            achieved, mfu = utilisation(row["tokens_per_s"], forward_per_token, peak_flops(name, "bf16-mixed"))
            figures["rows"].append({"label": f"forward, bf16 autocast, flash attention forced, {sizes['chunk']} "
                                    "episodes", "kind": "inference", "precision": "bf16-mixed", **row,
                                    "model_flops_per_s": achieved, "mfu": mfu})
    return figures


# ------------------------------------------------------------------------------------------ the report
WHY_SMALL_STEPS = (
    "Why MFU is low on this model: a reference step (64 episodes x 131 tokens, width 64) is about 13.5 GFLOP, "
    "a few µs at a data-centre GPU's peak, while it launches hundreds of small kernels; the step is bound by "
    "kernel launches, the host, and the episode sampler (its rate per CPU core is in BENCHMARKS.md's data "
    "section), not by arithmetic. "
    "That is where the step's removed host syncs pay on a GPU: the host now queues the next step's kernels "
    "while the device runs (no `loss.cpu()` / `bool(isfinite)` / all-reduce per step; one sync per "
    "`trainer.log_every` steps), SDPA gets no mask for fixed-size tasks so it may take a fused kernel, and "
    "`trainer.compile` fuses the small kernels. Larger batches (data.batch_size) and more loader workers "
    "(data.num_workers) raise MFU further.")


def markdown(figures: dict[str, Any], seconds: float, command: str) -> str:
    rows = []
    for r in figures["rows"]:
        ms = r["s_per_step"] * 1000 if r["kind"] == "train" else None
        mem = r.get("peak_memory_gib")
        rows.append([r["label"], ms, r["episodes_per_s"], r["tokens_per_s"],
                     "—" if mem is None else f"{mem:.2f}", r["model_flops_per_s"] / 1e12,
                     "—" if r["mfu"] is None else f"{r['mfu']:.2%}"])
    flops = figures["flops"]
    name = figures["device"]
    peaks = next(((bf16, fp32) for key, bf16, fp32 in PEAK_TFLOPS if key.lower() in name.lower()), None)
    begin, end = section_markers(GPU_SECTION)
    lines = [begin, "## GPU proof", "",
             f"Command: `{command}` ({seconds / 60:.1f} min, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", ""]
    if figures["cpu"]:
        lines += ["> **--cpu path check**: tiny sizes on CPU; these figures check the script, they measure nothing.", ""]
    else:
        peak_text = (f"dense peak {peaks[0] or '—'} TFLOP/s bf16, {peaks[1]} TFLOP/s fp32" if peaks
                     else "not in the peak table of benchmarks/gpu_check.py: no MFU")
        lines += [f"Device: {name} ({peak_text}); torch {torch.__version__}, CUDA {torch.version.cuda}.", ""]
    lines += [f"Reference config (depth {flops['depth']}, width {flops['width']}, n + k = {flops['n']} + "
              f"{flops['k']} tokens): {flops['forward_per_episode']:,} forward FLOPs per episode, "
              f"{flops['training_per_token']:,.0f} training FLOPs per token (3 x forward). Training rows: "
              f"{figures['sizes']['warmup']} + {figures['sizes']['steps']} steps, the first {figures['sizes']['warmup']} "
              "not timed; MFU = model FLOP/s over the peak for the run's precision.", "",
              WHY_SMALL_STEPS, "",
              markdown_table(["run", "ms/step", "episodes/s", "tokens/s", "peak memory (GiB)", "model TFLOP/s", "MFU"],
                             rows), end]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU path at tiny sizes: checks the script only")
    parser.add_argument("--out", type=Path, default=None,
                        help="the BENCHMARKS.md whose GPU section to rewrite (default: BENCHMARKS.md on a GPU, "
                             "none with --cpu)")
    parser.add_argument("--bf16", action="store_true",
                        help="with --cpu: run the mixed-precision rows in bf16-mixed, as on a GPU")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    if args.bf16 and not args.cpu:
        parser.error("--bf16 goes with --cpu (on a GPU the mixed-precision rows are bf16-mixed already)")
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; run on a GPU node, or pass --cpu to check the script",
              file=sys.stderr)
        return 2
    os.environ.setdefault("WANDB_MODE", "disabled")
    out = args.out if args.out is not None or args.cpu else REPO / "BENCHMARKS.md"
    start = time.perf_counter()
    figures = run(args.cpu, args.bf16)
    seconds = time.perf_counter() - start
    command = "benchmarks/gpu_check.sh" + (" --cpu" if args.cpu else "") + (" --bf16" if args.bf16 else "")
    section = markdown(figures, seconds, command)
    print(section)
    if args.json:
        print(json.dumps(figures, indent=2, default=str))
    if out is not None:
        write_report(out, replace_section(out.read_text() if out.exists() else "# Benchmarks\n", GPU_SECTION, section))
        progress(f"gpu_check: wrote the GPU section of {out} in {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
