"""Run every benchmark and rewrite BENCHMARKS.md (atomically): `make bench`.

Sections, in order: data throughput (bench_data), training throughput (bench_train), the reference model
(trained once and cached under benchmarks/.cache keyed by its config hash, or reused from there), inference
speed and memory (bench_inference), clustering quality (bench_quality). Progress goes to stderr; the report
and a JSON of every figure are written at the end, only when every section succeeded.

    .venv/bin/python benchmarks/run_all.py                  # the full run (make bench), rewrites BENCHMARKS.md
    .venv/bin/python benchmarks/run_all.py --quick          # tiny sizes, a 30-step model: checks the scripts
    .venv/bin/python benchmarks/run_all.py --reuse-run RUN  # seed the cache with a finished reference run
    .venv/bin/python benchmarks/run_all.py --sections data,pretrained   # re-measure two sections only

Sections left out of --sections are carried over from the existing BENCHMARKS.md as they were (with their
remarks), and the header names them: a change that moves one kind of figure re-measures that kind alone.

The model of the inference and quality sections: the full reference run (configs/reference.yaml) when it is
in the cache or given by --reuse-run, or trained with --full-reference (about 7 more minutes on 2 cores);
otherwise a 1,000-step run of the same config, trained once and cached, so that `make bench` stays within
15 minutes. The report names the command of the model it used.

--quick writes benchmarks/.cache/BENCHMARKS.quick.md unless --out is given, so it never replaces the
committed figures with smoke-test ones.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from emformer.train import rundir  # noqa: E402
from common import (CACHE, REPO, TrainedModel, kept_sections, load_average, machine_info,  # noqa: E402
                    machine_markdown, progress, replace_section, resolved_hash, save_json, trained_model,
                    usable_cpus, write_report)

SECTIONS = ("data", "train", "inference", "quality", "pretrained")
REFERENCE = "configs/reference.yaml"
# --quick: a real but barely trained model of the reference task (tiny architecture, 30 steps), so the
# inference and quality scripts run end to end in seconds. Its figures mean nothing.
# Without a cached (or --reuse-run) full reference run, the full benchmark trains this shorter one so that
# `make bench` stays within its 15 minutes; --full-reference trains configs/reference.yaml as is instead.
BUDGET_OVERRIDES = ["trainer.max_steps=1000"]
QUICK_OVERRIDES = ["model=tiny", "trainer.max_steps=30", "trainer.val_every=30", "trainer.ckpt_every=30",
                   "trainer.log_every=10", "optim.warmup_steps=5", "eval.episodes=64", "trainer.threads=1"]


def _unpack(result: Any) -> tuple[dict[str, Any], str]:
    """A section's (figures, markdown); bench_data may return the table inside its dict."""
    if isinstance(result, tuple):
        figures, table = result
        return dict(figures), str(table)
    if isinstance(result, dict):
        for key in ("markdown", "table"):
            if isinstance(result.get(key), str):
                return {k: v for k, v in result.items() if k != key}, result[key]
    raise TypeError(f"a benchmark section returned {type(result).__name__}; expected (figures, markdown)")


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def pick_model(quick: bool, cache: Path, reuse: Optional[Path], full_reference: bool) -> TrainedModel:
    """--quick: the 30-step smoke model. Otherwise the full reference run when cached, given (--reuse-run) or
    asked for (--full-reference), else the 1000-step budget run (cached too)."""
    if quick:
        return trained_model(REFERENCE, QUICK_OVERRIDES, cache=cache)
    full_slot = cache / f"reference-{resolved_hash(REFERENCE, [])}" / "run"
    if rundir.is_done(full_slot) or reuse is not None or full_reference:
        return trained_model(REFERENCE, [], cache=cache, reuse=reuse)
    progress("no cached full reference run: training the 1000-step budget run (--full-reference or "
             "--reuse-run RUN for the full one)")
    return trained_model(REFERENCE, BUDGET_OVERRIDES, cache=cache)


def run_sections(sections: list[str], quick: bool, export: Optional[Path], reuse: Optional[Path],
                 cache: Path, memory: bool = True, threads: Optional[int] = None, full_reference: bool = False) -> tuple[dict[str, Any], dict[str, str], dict[str, float], Optional[TrainedModel]]:
    figures: dict[str, Any] = {}
    tables: dict[str, str] = {}
    seconds: dict[str, float] = {}
    model: Optional[TrainedModel] = None

    def timed(name: str, work: Callable[[], Any]) -> Any:
        progress(f"== {name} ==")
        start = time.perf_counter()
        out = work()
        seconds[name] = time.perf_counter() - start
        progress(f"== {name} done in {seconds[name]:.0f} s ==")
        return out

    if "data" in sections:
        import bench_data

        figures["data"], tables["data"] = _unpack(timed("data", lambda: bench_data.run(quick)))
    if "train" in sections:
        import bench_train

        figures["train"], tables["train"] = timed("train", lambda: bench_train.run(quick))
    if {"inference", "quality"} & set(sections):
        import torch

        # bench_data caps this process at one thread for its per-core rates; the rest uses every core
        # (one in --quick, where the machine may be shared: idle OpenMP threads spin on a loaded machine).
        torch.set_num_threads(threads or (1 if quick else usable_cpus()))
        if export is None:
            model = timed("model", lambda: pick_model(quick, cache, reuse, full_reference))
            export = model.export_dir
        if "inference" in sections:
            import bench_inference

            figures["inference"], tables["inference"] = timed("inference", lambda: bench_inference.run(export, quick, memory))
        if "quality" in sections:
            import bench_quality

            figures["quality"], tables["quality"] = timed("quality", lambda: bench_quality.run(export, quick))
        figures["export"] = str(export)
    if "pretrained" in sections:
        import bench_pretrained

        figures["pretrained"], tables["pretrained"] = timed("pretrained", lambda: bench_pretrained.run(quick=quick, heading=False))
    return figures, tables, seconds, model


def data_against_measured_step(figures: dict[str, Any]) -> tuple[Optional[str], list[str]]:
    """The data section's slowest path against the training step measured in this run (bench_data uses a
    fixed reference step time); the sentence for the report and any remark."""
    remarks: list[str] = []
    data = figures.get("data", {}).get("figures", {})
    if data and not data.get("pass", True):
        remarks.append(f"Data: the slowest reference-task data path delivers only {data['worst_x_step']:.1f}x what a "
                       f"training step consumes (target {data['target_x']:.0f}x); see the data table.")
    train = figures.get("train", {}).get("cpu", [])
    reference = [r for r in train if r["config"] == "reference"]
    if not data or not reference or "worst_x_step" not in data:
        return None, remarks
    fastest = max(reference, key=lambda r: r["episodes_per_s"])
    worst_rate = data["worst_x_step"] * data["step_consumes_eps_per_s"]
    ratio = worst_rate / fastest["episodes_per_s"]
    text = (f"Against the reference training step measured in this run ({fastest['s_per_step'] * 1000:.0f} ms for "
            f"{fastest['episodes_per_step']} episodes = {fastest['episodes_per_s']:.0f} episodes/s, 1 process x "
            f"{fastest['threads']} thread(s)), the slowest data path is {ratio:.1f}x "
            f"({'meets' if ratio >= 20 else 'misses'} the 20x target).")
    if ratio < 20:
        remarks.append(f"Data: against the training step measured in this run the slowest data path is only "
                       f"{ratio:.1f}x (target 20x).")
    return text, remarks


def bench_pretrained_title() -> str:
    import bench_pretrained

    return bench_pretrained.SECTION_TITLE.removeprefix("## ")


def bench_pretrained_command(quick: bool) -> str:
    import bench_pretrained

    return bench_pretrained.command(quick=quick)


def report(figures: dict[str, Any], tables: dict[str, str], seconds: dict[str, float], info: dict[str, Any],
           model: Optional[TrainedModel], export: Optional[str], quick: bool, command: str,
           carried: Optional[dict[str, str]] = None, carried_remarks: Optional[list[str]] = None) -> str:
    """BENCHMARKS.md from the sections measured now; `carried` (section -> its whole block from the previous
    report) fills the sections not run this time, with their `carried_remarks`, marked as carried."""
    carried = carried or {}
    total = sum(seconds.values())
    load_end = load_average()
    lines = ["# Benchmarks", ""]
    if quick:
        lines += ["> **--quick run**: tiny sizes and a 30-step model. These figures check that the scripts work; "
                  "they measure nothing. `make bench` gives the real ones.", ""]
    lines += [f"Written by `{command}` in {total / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}). "
              f"The figures of the sections it measured ({', '.join(seconds)}) were measured in that run, on this "
              "machine (a section one bench script rewrote alone since names its own):", "",
              machine_markdown(info, load_end), "",
              "Wall-clock rates depend on the load: on a shared machine they are lower bounds.", ""]
    if carried:
        lines += [f"Not re-measured by that command, carried over as they were from the previous report (each "
                  f"with its own command and machine): {', '.join(carried)}.", ""]
    data_text, remarks = data_against_measured_step(figures)
    if data_text and "data" in tables:
        tables = {**tables, "data": tables["data"] + "\n\n" + data_text}
    for section in SECTIONS:
        if section in figures:
            remarks += list(figures[section].get("remarks", []))
    remarks += list(carried_remarks or [])
    if remarks:
        lines += ["## Where the numbers are bad, and why", ""] + [f"- {r}" for r in remarks] + [""]

    export_arg = _rel(Path(export)) if export else "EXPORT_DIR"
    commands = {
        "data": (SECTION_TITLES["data"], ".venv/bin/python benchmarks/bench_data.py"),
        "train": (SECTION_TITLES["train"], ".venv/bin/python benchmarks/bench_train.py" + (" --quick" if quick else "")),
        "inference": (SECTION_TITLES["inference"],
                      f".venv/bin/python benchmarks/bench_inference.py --export {export_arg}" + (" --quick" if quick else "")),
        "quality": (SECTION_TITLES["quality"],
                    f".venv/bin/python benchmarks/bench_quality.py --export {export_arg}" + (" --quick" if quick else "")),
        "pretrained": (bench_pretrained_title(), bench_pretrained_command(quick)),
    }
    for section in SECTIONS:
        if section not in tables:
            if section in carried:
                lines += [carried[section].rstrip("\n"), ""]
            continue
        title, cmd = commands[section]
        lines += [f"## {title}", "", f"Command: `{cmd}`", ""]
        if section in ("inference", "quality"):
            lines += [f"Model: {model.describe() if model else f'the export `{export_arg}`'}.", ""]
        lines += [tables[section], ""]
    return "\n".join(lines)


SECTION_TITLES = {  # section -> its heading in BENCHMARKS.md (report() writes them)
    "data": "Data: episodes/s against what one training step consumes",
    "train": "Training throughput (CPU; GPU when one is present)",
    "inference": "Inference: time and memory to cluster a batch of episodes",
    "quality": "Clustering quality: the model against EM, Lloyd, scikit-learn and the oracle",
}
REMARK_PREFIXES = {"data": ("Data",), "train": ("Training",), "inference": ("The transformer", "Inference"),
                   "quality": ("Quality",), "pretrained": ("Pretrained", "The pretrained")}


def previous_sections(text: str, sections: list[str]) -> tuple[dict[str, str], list[str]]:
    """From a previous BENCHMARKS.md: the blocks of `sections` (heading to the next `## ` heading, the
    hand-measured blocks left out: they are carried over on their own) and their remark bullets."""
    for block in kept_sections(text).values():
        text = text.replace(block, "")
    titles = {**SECTION_TITLES, "pretrained": bench_pretrained_title()}
    blocks: dict[str, str] = {}
    parts = ("\n" + text).split("\n## ")
    for section in sections:
        for part in parts[1:]:
            if part.startswith(titles[section] + "\n"):
                blocks[section] = "## " + part.rstrip("\n")
    remarks = [line[2:] for part in parts[1:] if part.startswith("Where the numbers are bad")
               for line in part.splitlines() if line.startswith("- ")
               and any(line[2:].startswith(p) for s in blocks for p in REMARK_PREFIXES[s])]
    return blocks, remarks


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a 30-step model: checks the scripts only")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--out", type=Path, default=None,
                        help="report path (default: BENCHMARKS.md; with --quick benchmarks/.cache/BENCHMARKS.quick.md)")
    parser.add_argument("--export", type=Path, default=None,
                        help="benchmark this export directory instead of the cached reference model")
    parser.add_argument("--reuse-run", type=Path, default=None,
                        help="a finished run of configs/reference.yaml to copy into the cache instead of training one")
    parser.add_argument("--skip-memory", action="store_true",
                        help="skip the inference memory probes (three fresh processes)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for inference and quality (default: every usable core; 1 with --quick)")
    parser.add_argument("--full-reference", action="store_true",
                        help="train configs/reference.yaml in full (2,500 steps) when it is not cached, instead of "
                             "the 1,000-step budget run")
    parser.add_argument("--cache", type=Path, default=CACHE, help="cache of trained models (default benchmarks/.cache)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        parser.error(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    if args.export is not None and not (args.export / "config.json").is_file():
        parser.error(f"--export {args.export}: not an export directory (no config.json)")
    os.environ.setdefault("WANDB_MODE", "disabled")
    out = args.out or (args.cache / "BENCHMARKS.quick.md" if args.quick else REPO / "BENCHMARKS.md")
    given = list(argv) if argv is not None else sys.argv[1:]
    command = " ".join([".venv/bin/python benchmarks/run_all.py", *given]) if given else "make bench"

    info = machine_info()
    progress(f"benchmarks: sections {', '.join(sections)}{' (quick)' if args.quick else ''}; "
             f"{info['cpus_usable']} core(s), load {info['load_avg_1m']:.2f}; report -> {_rel(out)}")
    figures, tables, seconds, model = run_sections(sections, args.quick, args.export, args.reuse_run, args.cache,
                                                  memory=not args.skip_memory, threads=args.threads,
                                                  full_reference=args.full_reference)
    carried, carried_remarks = ({}, []) if args.quick or set(sections) == set(SECTIONS) else previous_sections(
        out.read_text() if out.exists() else "", [s for s in SECTIONS if s not in sections])
    text = report(figures, tables, seconds, info, model, figures.get("export"), args.quick, command,
                  carried, carried_remarks)
    # the GPU proof and the hand-measured blocks are not measured here: carried over as they are
    for name, block in (kept_sections(out.read_text()) if out.exists() else {}).items():
        text = replace_section(text, name, block)
    write_report(out, text)
    results = out.with_name(out.stem + ".json") if out.parent != REPO else args.cache / "results.json"
    save_json(results, {"machine": info, "seconds": seconds, "quick": args.quick, "figures": figures})
    progress(f"wrote {_rel(out)} and {_rel(results)} in {sum(seconds.values()) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
