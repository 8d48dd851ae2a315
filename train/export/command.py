"""`emformer export RUN_DIR|CHECKPOINT --out DIR [--onnx] [--best|--last]`, `emformer export EXPORT_DIR --rescore`
(DESIGN §4).

An export directory (its format: models/export_format.py) is what a user needs to cluster their own data
without the training code:

    model.safetensors   the ClusterTransformer's weights (fp32)
    config.json         architecture (TransformerConfig), the task spec it was trained on, the k / d / n it
                        supports, input_scale (for standardization), training commit and step, eval
                        figures, sha256 of every file, format version
    README.md           model card: task, supported inputs, eval figures against EM and the oracle, usage
    model.onnx          with --onnx: inputs points [B,n,d] f32, mask [B,n] bool, init [B,k,d] f32,
                        kmask [B,k] bool -> logits [B,n,k] (padded clusters -inf); B and n dynamic, checked
                        against torch with onnxruntime at several n before it is written

Sources (read by train/checkpoints.py): a run directory (its best or last checkpoint), a Lightning checkpoint
file, or a DeepSpeed checkpoint directory (ZeRO-1/2/3, possibly sharded over ranks; consolidated with
DeepSpeed's zero_to_fp32). The ONNX step is onnx.py, the model card card.py + model_card.md.j2.
Every file is written atomically; config.json last, so a directory whose config.json matches its files (by
sha256) is a complete export. Lightning and DeepSpeed are never imported for a Lightning checkpoint, and
DeepSpeed only for a DeepSpeed one. `--rescore` re-measures an export's test-set figures (config.json's eval
row and the card) on the current episodes (tasks.EPISODES_VERSION, recorded in the row) from its own weights,
with no run directory: the figures of a shipped model follow the episodes when they change.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from emformer.data.episodes import sample_episodes
from emformer.data.standardize import STANDARD_SCALE
from emformer.data.stream import eval_set
from emformer.data.tasks import EPISODES_VERSION, TaskSpec
from emformer.errors import CheckpointError, ConfigError
from emformer.models.calibration import count_figures, fit_k_posterior
from emformer.models.clusterer import Clusterer
from emformer.models.export_loader import check_state_dict, load_exported_model
from emformer.models.export_format import (
    CARD_FILE, CLUSTERER_DEFAULTS, CONFIG_FILE, COUNT_HEAD, DEFAULTABLE, EXPORT_FORMAT, EXPORT_FORMAT_VERSION, ONNX_FILE,
    WEIGHTS_FILE, file_entry, publish, read_export_config, write_export_config,
)
from emformer.models.registry import resolve_model_dir
from emformer.models.transformer import ClusterTransformer, TransformerConfig
from emformer.train import rundir
from emformer.train.checkpoints import LoadedCheckpoint, load_checkpoint
from emformer.train.config import RunConfig, to_run_config
from emformer.train.export.card import model_card
from emformer.train.export.onnx import write_onnx
from emformer.train.scoring import held_out_test_seed, score_model
from emformer.version import __version__


# ------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a run directory, a checkpoint file (.ckpt) or a DeepSpeed checkpoint directory")
    parser.add_argument("--out", default=None, help="export directory to write (created if missing)")
    parser.add_argument("--rescore", action="store_true",
                        help="SOURCE is an export directory: re-measure its test-set figures (config.json eval, "
                             "README.md) on the current episodes and refit its P(k | X), in place")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx (dynamic batch and n), "
                        "verified against torch with onnxruntime")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--best", dest="which", action="store_const", const="best",
                       help="from a run directory: the checkpoint with the lowest val loss (default)")
    which.add_argument("--last", dest="which", action="store_const", const="last",
                       help="from a run directory: the latest checkpoint")
    parser.add_argument("--clusterer-defaults", nargs="+", metavar="KEY=INT", default=[],
                        help=f"Clusterer parameters this model is meant to run with, written to config.json "
                             f"(from_pretrained uses them unless given others): {', '.join(DEFAULTABLE)}; "
                             f"e.g. n_init=10 em_steps=3")


def parse_clusterer_defaults(items: list[str]) -> dict[str, int]:
    """['n_init=10', 'em_steps=3'] -> {'n_init': 10, 'em_steps': 3}, or a ConfigError naming the item."""
    out: dict[str, int] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in DEFAULTABLE:
            raise ConfigError(f"--clusterer-defaults {item}: expected KEY=INT with KEY one of {', '.join(DEFAULTABLE)}")
        try:
            out[key] = int(value)
        except ValueError:
            raise ConfigError(f"--clusterer-defaults {item}: {value!r} is not an integer") from None
        if out[key] < DEFAULTABLE[key]:
            raise ConfigError(f"--clusterer-defaults {item}: expected an integer >= {DEFAULTABLE[key]}")
    return out


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    source = Path(args.source)
    if args.rescore:
        if args.out or args.onnx or args.which or args.clusterer_defaults:
            raise ConfigError("--rescore: takes an export directory alone (no --out, --onnx, --best/--last, "
                              "--clusterer-defaults)")
        row = read_export_config(rescore_export(source))["eval"]
        print(f"rescored {source} on episodes version {row['episodes_version']} ({row['episodes']} test episodes "
              f"of seed {row['seed']}): err {row['err']:.4f}, EM {row['err_em']:.4f}, oracle {row['err_oracle']:.4f} "
              f"in {time.perf_counter() - started:.1f} s")
        return 0
    if args.out is None:
        raise ConfigError("--out: required (the export directory to write), unless --rescore")
    if args.which and source.exists() and not rundir.looks_like_run_dir(source):
        raise ConfigError(f"--{args.which}: only applies to a run directory; {source} is a checkpoint")
    out = export_run(source, args.out, onnx=args.onnx, which=args.which or "best",
                     clusterer_defaults=parse_clusterer_defaults(args.clusterer_defaults))
    config = read_export_config(out)
    files = ", ".join(sorted([*config["files"], CARD_FILE, CONFIG_FILE]))
    print(f"exported {config['training']['checkpoint']} (step {config['training']['step']}) to {out}: {files} "
          f"in {time.perf_counter() - started:.1f} s")
    if "onnx" in config:
        print(f"onnx checked against torch at (batch, n) {config['onnx']['checked_sizes']}: "
              f"max abs diff {config['onnx']['max_abs_diff']:.2e}")
    return 0


# ------------------------------------------------------------------------------------------- API
def export_run(run_dir: str | Path, out_dir: str | Path, onnx: bool = False, which: str = "best",
               clusterer_defaults: Optional[dict[str, int]] = None) -> Path:
    """Export checkpoints/{which}.ckpt of a run directory into out_dir and return out_dir. `run_dir` may
    also be a checkpoint (a .ckpt file or a DeepSpeed checkpoint directory); `which` then does not apply.

    Writes model.safetensors, config.json, README.md and, with onnx=True, model.onnx (verified with
    onnxruntime first), and clusterer_defaults into config.json when given. Raises CheckpointError /
    ConfigError naming the file and the problem."""
    run_dir = Path(run_dir)
    checkpoint = rundir.checkpoint_path(run_dir, which)  # checks `which` first
    if run_dir.exists() and not rundir.looks_like_run_dir(run_dir):
        return export_checkpoint(run_dir, out_dir, onnx=onnx, clusterer_defaults=clusterer_defaults)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory or checkpoint")
    if not checkpoint.exists():
        present = rundir.checkpoints_present(run_dir)
        raise CheckpointError(f"{checkpoint}: missing (checkpoints present: {present or 'none'}); "
                              f"has the run saved a checkpoint yet?")
    return export_checkpoint(checkpoint, out_dir, onnx=onnx, run_dir=run_dir, clusterer_defaults=clusterer_defaults)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, onnx: bool = False,
                      run_dir: Optional[str | Path] = None, clusterer_defaults: Optional[dict[str, int]] = None) -> Path:
    """Export one checkpoint (Lightning file or DeepSpeed directory). `run_dir` (default: the checkpoint's
    grandparent when it is a run directory) supplies meta.json and the eval figures."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if run_dir is None and rundir.looks_like_run_dir(checkpoint.parent.parent):
        run_dir = checkpoint.parent.parent
    run_dir = Path(run_dir) if run_dir is not None else None
    loaded = load_checkpoint(checkpoint)
    run = to_run_config(loaded.run_config, where=f"{checkpoint}: hyper_parameters.config")
    architecture = TransformerConfig.from_task_and_model(run.task, run.model)
    model = ClusterTransformer(architecture)
    check_state_dict(model, loaded.state_dict, where=str(checkpoint))
    model.load_state_dict(loaded.state_dict, strict=True)
    model.eval()
    task = run.task.validate(f"{checkpoint}: hyper_parameters.config.task")

    meta = rundir.read_meta(run_dir) if run_dir else {}
    eval_row = _test_row(model, task, run, loaded.step)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Any]] = {}

    # Weights: contiguous fp32 copies (safetensors refuses shared or strided storage).
    from safetensors.torch import save_file

    tensors = {key: value.detach().to(torch.float32).contiguous().clone() for key, value in model.state_dict().items()}
    publish(out_dir / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    files[WEIGHTS_FILE] = file_entry(out_dir / WEIGHTS_FILE)

    onnx_info = None
    if onnx:
        onnx_info = write_onnx(model, architecture, out_dir / ONNX_FILE)
        files[ONNX_FILE] = file_entry(out_dir / ONNX_FILE)
    elif (out_dir / ONNX_FILE).exists():
        (out_dir / ONNX_FILE).unlink()  # a stale model.onnx from an earlier export would not match these weights

    config = build_export_config(architecture, task, loaded, meta, eval_row, files, onnx_info, model)
    if clusterer_defaults:
        config[CLUSTERER_DEFAULTS] = dict(clusterer_defaults)
    if model.count_head is not None:
        config[COUNT_HEAD] = count_calibration(model, config, run)
    config["selection"] = _eval_row(run_dir, loaded.step) if run_dir else None  # the eval-set row it was chosen on
    # Re-exporting into a published model keeps what its maintainer added to the card (title, known limits).
    old_card = (out_dir / CARD_FILE).read_text() if (out_dir / CARD_FILE).is_file() else ""
    card = with_added_sections(model_card(config, str(out_dir)), old_card)
    publish(out_dir / CARD_FILE, lambda tmp: tmp.write_text(card))
    write_export_config(out_dir, config)  # last: it vouches for the files above
    return out_dir


def rescore_export(export_dir: str | Path) -> Path:
    """Re-measure an export's test-set figures on the current episodes from its own weights and training
    config (config.json), and refit its P(k | X) (count_calibration) when it has a count head, rewriting its
    eval row, count_head and card; weights and the other files stay as they are."""
    export_dir = resolve_model_dir(export_dir)
    model, config = load_exported_model(export_dir)
    where = f"{export_dir / CONFIG_FILE}: training.run_config"
    run = to_run_config(config["training"]["run_config"], where=where)
    task = run.task.validate(where + ".task")
    config["eval"] = _test_row(model, task, run, config["training"].get("step"))
    if model.count_head is not None:
        config[COUNT_HEAD] = count_calibration(model, config, run)
    old_card = (export_dir / CARD_FILE).read_text() if (export_dir / CARD_FILE).is_file() else ""
    card = with_added_sections(model_card(config, str(export_dir)), old_card)
    publish(export_dir / CARD_FILE, lambda tmp: tmp.write_text(card))
    write_export_config(export_dir, config)
    return export_dir


CARD_TITLE = "# emformer model card:"


def with_added_sections(card: str, old_card: str) -> str:
    """`card` followed by the `## ` sections of `old_card` whose titles the template does not write (text a
    maintainer added to a shipped card, such as its known limits), in their order, under the old card's
    title line."""
    def sections(text: str) -> list[str]:
        parts, current = [], None
        for line in text.splitlines(keepends=True):
            if line.startswith("## "):
                current = [line]
                parts.append(current)
            elif current is not None:
                current.append(line)
        return ["".join(part) for part in parts]

    def title(part: str) -> str:  # "## Evaluation (test set at step …)" -> "## Evaluation"
        return part.splitlines()[0].split(" (")[0].strip()

    rendered = {title(part) for part in sections(card)}
    added = [part for part in sections(old_card) if title(part) not in rendered]
    heading = old_card.split("\n", 1)[0]
    if heading.startswith(CARD_TITLE):  # the model's name as its maintainer gave it
        card = heading + "\n" + card.split("\n", 1)[1]
    return card.rstrip("\n") + "\n\n" + "".join(added).rstrip("\n") + "\n" if added else card


# ------------------------------------------------------------------------------------------- test set
def _test_row(model: Any, task: TaskSpec, run: RunConfig, step: Optional[int]) -> dict[str, Any]:
    """The card's figures: the model and the baselines on the run's test set (eval.test_seed), never on the
    eval set the checkpoint was selected on; the episodes version says which episodes those were."""
    seed = held_out_test_seed(run)
    metrics = score_model(model, task, run.eval, seed)
    return {"split": "test", "seed": seed, "step": step, "episodes": run.eval.episodes,
            "episodes_version": EPISODES_VERSION, **metrics}


COUNT_FIT_SCALE = 2
"""P(k | X) is fitted on this many times the eval set's episodes of its seed (the eval set, then the episodes
that follow it): five numbers fitted on 512 episodes moved the held-out ECE by a few hundredths from one fit
set to the next"""


def count_calibration(model: Any, config: dict[str, Any], run: RunConfig) -> dict[str, Any]:
    """P(k | X)'s calibration (models/calibration.py), fitted on the run's eval seed (the eval set the
    checkpoint was selected on, extended to COUNT_FIT_SCALE times its size; never the test set) through the
    Clusterer the export will be; k accuracy and ECE on the test set with it, and of the count head alone (its
    softmax, T = 1)."""
    task = run.task
    # the evidence alone: whatever count_head the config holds already (an older fit) plays no part
    clusterer = Clusterer(model, {key: value for key, value in config.items() if key != COUNT_HEAD},
                          n_clusters="auto", random_state=0)
    k_all = torch.arange(task.k, task.k_pad + 1)

    def evidence(seed: int, episodes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = eval_set(task, seed, episodes)
        logits, bics = [], []
        for points, mask in zip(batch["points"], batch["mask"]):
            ks, row_logits, row_bics = clusterer.k_evidence(points[mask].double().numpy())
            if len(ks) < len(k_all):  # fewer distinct points than clusters: those k are impossible
                row_logits = torch.cat([row_logits, torch.full((len(k_all) - len(ks),), -math.inf)])
                row_bics = torch.cat([row_bics, torch.full((len(k_all) - len(ks),), math.inf)])
            logits.append(row_logits)
            bics.append(row_bics)
        return torch.stack(logits), torch.stack(bics), batch["mask"].sum(1).double(), batch["k"] - task.k

    fit_seed, test_seed = int(run.eval.seed), held_out_test_seed(run)
    fit_episodes = COUNT_FIT_SCALE * run.eval.episodes
    fit_logits, fit_bics, fit_n, fit_target = evidence(fit_seed, fit_episodes)
    posterior = fit_k_posterior(fit_logits, fit_target, fit_bics, fit_n)
    test_logits, test_bics, test_n, test_target = evidence(test_seed, run.eval.episodes)
    return {**posterior.to_dict(),
            "fitted_on": {"seed": fit_seed, "episodes": fit_episodes},
            "test": {"seed": test_seed, "episodes": run.eval.episodes,
                     **count_figures(test_logits, test_target, posterior, test_bics, test_n)},
            "test_count_head_alone": count_figures(test_logits, test_target)}


# ------------------------------------------------------------------------------------------- run files
def _eval_row(run_dir: Path, step: Optional[int]) -> Optional[dict[str, Any]]:
    """The val row of the checkpoint's step, else the final one (DONE's, else the last logged)."""
    rows = [row for row in rundir.read_metrics(run_dir) if row.get("split") == "val"]
    for row in reversed(rows):
        if step is not None and row.get("step") == step:
            return row
    done = rundir.read_done(run_dir)  # {"step", "val": final val row, ...}
    final = done.get("val") if isinstance(done.get("val"), dict) else (done if "err" in done else None)
    if isinstance(final, dict) and "err" in final:
        return final
    return rows[-1] if rows else None


def _find_commit(meta: dict[str, Any]) -> Optional[str]:
    for key in ("git_commit", "commit"):
        if isinstance(meta.get(key), str):
            return meta[key]
    git = meta.get("git")
    if isinstance(git, dict) and isinstance(git.get("commit"), str):
        return git["commit"]
    return None


def input_scale(task: TaskSpec, episodes: int = 256, d: Optional[int] = None) -> float:
    """RMS within-episode standard deviation of one real coordinate of the training points (of the task's
    episodes at dimension d, default the task's own): what a standardized feature is scaled to so user data
    looks like the training episodes (see Clusterer). Episodes standardized in training (task.standardize)
    have the target spread by construction, whatever their d."""
    if task.standardize:
        return STANDARD_SCALE
    # Points do not depend on the init mode; noisy_truth skips k-means++/spectral work.
    spec = dataclasses.replace(task, init="noisy_truth")
    if d is not None:
        spec = dataclasses.replace(spec, d=d, d_min=None, d_max=None)
    batch = sample_episodes(spec, seed=12345, indices=range(episodes))
    x = batch["points"][..., : spec.d].double()
    m = batch["mask"][..., None].double()
    count = m.sum(1)
    mean = (x * m).sum(1) / count
    var = (((x - mean[:, None]) ** 2) * m).sum(1) / count
    return float(var.mean().sqrt())


def build_export_config(architecture: TransformerConfig, task: TaskSpec, loaded: LoadedCheckpoint,
                        meta: dict[str, Any], eval_row: Optional[dict[str, Any]], files: dict[str, Any],
                        onnx_info: Optional[dict[str, Any]], model: ClusterTransformer) -> dict[str, Any]:
    config: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "architecture": architecture.to_dict(),
        "parameters": model.num_parameters(),
        "task": task.to_dict(),
        "supported": {
            "k": {"min": 2, "max": architecture.k_max, "trained": [task.k, task.k_pad],
                  "note": "k below k_max masks the unused centroid slots"},
            "d": {"min": 1, "max": architecture.d_in,
                  "trained": [task.d_min if task.d_min is not None else task.d, task.d],
                  "note": "d below max is zero-padded to max"},
            "n": {"min": "k", "max": None, "trained": [task.n, task.n_pad],
                  "note": "any n >= k, the number of clusters asked for (no upper bound: no positional "
                          "encoding); attention memory grows as n^2"},
        },
        "input_scale": input_scale(task),
        # The spread a standardized feature gets at each d the model takes: with Δ fixed, the means' spread
        # per coordinate shrinks as d grows, so one scale for every d would change the noise scale.
        "input_scale_by_d": {str(d): input_scale(task, d=d) for d in range(1, architecture.d_in + 1)},
        "init": task.init,
        "training": {
            "checkpoint": str(loaded.path),
            "checkpoint_format": loaded.kind,
            "zero_stage": loaded.zero_stage,
            "step": loaded.step,
            "commit": _find_commit(meta),
            "run_name": meta.get("run_name") or meta.get("name") or loaded.run_config.get("name"),
            "run_config": loaded.run_config,
        },
        "eval": eval_row,
        "files": files,
        "exported": {"at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "emformer": __version__, "torch": torch.__version__},
    }
    if onnx_info is not None:
        config["onnx"] = onnx_info
    return json.loads(json.dumps(config, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)
