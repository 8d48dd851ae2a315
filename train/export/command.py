"""`emformer export RUN_DIR|CHECKPOINT --out DIR [--onnx] [--best|--last]` (DESIGN §4).

An export directory is what a user needs to cluster their own data without the training code:

    model.safetensors   the ClusterTransformer's weights (fp32)
    config.json         architecture (TransformerConfig), the task spec it was trained on, the k / d / n it
                        supports, input_scale (for standardization), training commit and step, eval
                        figures, sha256 of every file, format version
    README.md           model card: task, supported inputs, eval figures against EM and the oracle, usage
    model.onnx          with --onnx: inputs points [B,n,d] f32, mask [B,n] bool, init [B,k,d] f32,
                        kmask [B,k] bool -> logits [B,n,k] (padded clusters -inf); B and n dynamic, checked
                        against torch with onnxruntime at several n before it is written

Sources: a run directory (checkpoints/best.ckpt or last.ckpt), a Lightning checkpoint file, or a DeepSpeed
checkpoint directory (ZeRO-1/2/3, possibly sharded over ranks; consolidated with DeepSpeed's zero_to_fp32).
Every file is written atomically; config.json last, so a directory whose config.json matches its files (by
sha256) is a complete export. Lightning and DeepSpeed are never imported for a Lightning checkpoint, and
DeepSpeed only for a DeepSpeed one.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import logging
import math
import os
import pickle
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from emformer.atomic import atomic_write
from emformer.data.episodes import sample_episodes
from emformer.data.tasks import TaskSpec
from emformer.errors import CheckpointError, ConfigError
from emformer.models.clusterer import (
    CONFIG_FILE, EXPORT_FORMAT, EXPORT_FORMAT_VERSION, ONNX_FILE, WEIGHTS_FILE, check_state_dict, sha256_file,
)
from emformer.models.transformer import ClusterTransformer, TransformerConfig
from emformer.train.config import RunConfig, to_run_config
from emformer.train.scoring import held_out_test_seed, score_model
from emformer.version import __version__

ONNX_CHECK_SIZES = ((1, 17), (3, 64), (2, 300))  # (batch, n) pairs checked against torch at export time
ONNX_ATOL = 1e-4
ONNX_RTOL = 1e-4
ONNX_OPSET = 18
_DEEPSPEED_STATE_KEYS = ("module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps",
                         "global_steps", "dp_world_size", "mp_world_size", "param_shapes", "frozen_param_shapes",
                         "frozen_param_fragments", "buffer_names", "shared_params", "ds_config", "ds_version")


@dataclasses.dataclass
class LoadedCheckpoint:
    """What an export needs from a training checkpoint, whatever its format."""

    path: Path
    kind: str  # "lightning" | "deepspeed"
    state_dict: dict[str, torch.Tensor]  # ClusterTransformer keys ("model." stripped), fp32
    run_config: dict[str, Any]
    step: Optional[int]
    zero_stage: Optional[int] = None


# ------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a run directory, a checkpoint file (.ckpt) or a DeepSpeed checkpoint directory")
    parser.add_argument("--out", required=True, help="export directory to write (created if missing)")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx (dynamic batch and n), "
                        "verified against torch with onnxruntime")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--best", dest="which", action="store_const", const="best",
                       help="from a run directory: the checkpoint with the lowest val loss (default)")
    which.add_argument("--last", dest="which", action="store_const", const="last",
                       help="from a run directory: the latest checkpoint")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    source = Path(args.source)
    if args.which and source.exists() and not _is_run_dir(source):
        raise ConfigError(f"--{args.which}: only applies to a run directory; {source} is a checkpoint")
    out = export_run(source, args.out, onnx=args.onnx, which=args.which or "best")
    config = json.loads((out / CONFIG_FILE).read_text())
    files = ", ".join(sorted([*config["files"], "README.md", CONFIG_FILE]))
    print(f"exported {config['training']['checkpoint']} (step {config['training']['step']}) to {out}: {files} "
          f"in {time.perf_counter() - started:.1f} s")
    if "onnx" in config:
        print(f"onnx checked against torch at (batch, n) {config['onnx']['checked_sizes']}: "
              f"max abs diff {config['onnx']['max_abs_diff']:.2e}")
    return 0


# ------------------------------------------------------------------------------------------- API
def export_run(run_dir: str | Path, out_dir: str | Path, onnx: bool = False, which: str = "best") -> Path:
    """Export checkpoints/{which}.ckpt of a run directory into out_dir and return out_dir. `run_dir` may
    also be a checkpoint (a .ckpt file or a DeepSpeed checkpoint directory); `which` then does not apply.

    Writes model.safetensors, config.json, README.md and, with onnx=True, model.onnx (verified with
    onnxruntime first). Raises CheckpointError / ConfigError naming the file and the problem."""
    run_dir = Path(run_dir)
    if which not in ("best", "last"):
        raise ConfigError(f"which: expected 'best' or 'last', got {which!r}")
    if run_dir.exists() and not _is_run_dir(run_dir):
        return export_checkpoint(run_dir, out_dir, onnx=onnx)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory or checkpoint")
    checkpoint = run_dir / "checkpoints" / f"{which}.ckpt"
    if not checkpoint.exists():
        present = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) if (run_dir / "checkpoints").is_dir() else []
        raise CheckpointError(f"{checkpoint}: missing (checkpoints present: {present or 'none'}); "
                              f"has the run saved a checkpoint yet?")
    return export_checkpoint(checkpoint, out_dir, onnx=onnx, run_dir=run_dir)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, onnx: bool = False,
                      run_dir: Optional[str | Path] = None) -> Path:
    """Export one checkpoint (Lightning file or DeepSpeed directory). `run_dir` (default: the checkpoint's
    grandparent when it is a run directory) supplies meta.json and the eval figures."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if run_dir is None and _is_run_dir(checkpoint.parent.parent):
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

    meta = _read_json(run_dir / "meta.json") if run_dir else {}
    eval_row = _test_row(model, task, run, loaded.step)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Any]] = {}

    # Weights: contiguous fp32 copies (safetensors refuses shared or strided storage).
    from safetensors.torch import save_file

    tensors = {key: value.detach().to(torch.float32).contiguous().clone() for key, value in model.state_dict().items()}
    _publish(out_dir / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    files[WEIGHTS_FILE] = _file_entry(out_dir / WEIGHTS_FILE)

    onnx_info = None
    if onnx:
        onnx_info = write_onnx(model, architecture, out_dir / ONNX_FILE)
        files[ONNX_FILE] = _file_entry(out_dir / ONNX_FILE)
    elif (out_dir / ONNX_FILE).exists():
        (out_dir / ONNX_FILE).unlink()  # a stale model.onnx from an earlier export would not match these weights

    config = build_export_config(architecture, task, loaded, meta, eval_row, files, onnx_info, model)
    config["selection"] = _eval_row(run_dir, loaded.step) if run_dir else None  # the eval-set row it was chosen on
    card = model_card(config, str(out_dir))
    _publish(out_dir / "README.md", lambda tmp: tmp.write_text(card))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _publish(out_dir / CONFIG_FILE, lambda tmp: tmp.write_text(text))  # last: it vouches for the files above
    return out_dir


def _publish(path: Path, write: Any) -> None:
    """Atomic write, readable by others (mkstemp creates files 0600; an export is meant to be shared)."""
    umask = os.umask(0)
    os.umask(umask)

    def write_public(tmp: Path) -> None:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)

    atomic_write(path, write_public)


# ------------------------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read a Lightning checkpoint file or a DeepSpeed checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        return _load_deepspeed(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    return LoadedCheckpoint(path=path, kind="lightning", state_dict=_model_weights(checkpoint["state_dict"], path),
                            run_config=_run_config(checkpoint, path), step=_step(checkpoint))


def _torch_load(path: Path, trusted: bool = False) -> Any:
    import zipfile

    if not zipfile.is_zipfile(path):  # every torch.save since 1.6 is a zip archive
        raise CheckpointError(f"{path}: not a readable torch checkpoint (not a torch.save zip archive)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if trusted:
            # DeepSpeed pickles its own config objects into its files (its zero_to_fp32 loads them with
            # weights_only=False too); only used for the model-states file of a DeepSpeed checkpoint.
            return torch.load(path, map_location="cpu", weights_only=False)
        lines = str(exc).splitlines()
        reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise CheckpointError(f"{path}: holds objects other than tensors and plain containers, refused for safety "
                              f"({reason})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(exc).splitlines()[0]})") from None


def _model_weights(state_dict: dict[str, Any], where: Path) -> dict[str, torch.Tensor]:
    """The ClusterTransformer's tensors: keys under `model.` (wrapper prefixes removed), as fp32."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("_forward_module.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith("model.") and isinstance(value, torch.Tensor):
            out[key[len("model."):]] = value.detach().to("cpu", torch.float32)
    if not out:
        raise CheckpointError(f"{where}: no weights under the 'model.' prefix (keys: {sorted(state_dict)[:5]} ...)")
    return out


def _run_config(checkpoint: dict[str, Any], where: Path) -> dict[str, Any]:
    config = (checkpoint.get("hyper_parameters") or {}).get("config")
    if not isinstance(config, dict) or "task" not in config or "model" not in config:
        raise CheckpointError(f"{where}: hyper_parameters['config'] is missing or has no task/model sections; "
                              f"was it written by `emformer train`?")
    return config


def _step(checkpoint: dict[str, Any]) -> Optional[int]:
    step = checkpoint.get("global_step")
    return int(step) if isinstance(step, (int, np.integer)) or (isinstance(step, torch.Tensor) and step.numel() == 1) else None


def _load_deepspeed(path: Path) -> LoadedCheckpoint:
    """A DeepSpeed checkpoint directory as Lightning's DeepSpeedStrategy writes it: `latest` names the tag
    folder (Lightning uses "checkpoint"), which holds the client state in mp_rank_00_model_states.pt
    (ZeRO-3: zero_pp_rank_0_mp_rank_00_model_states.pt) and the fp32 partitions in *_optim_states.pt."""
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
    else:
        tags = sorted(p.name for p in path.iterdir() if p.is_dir() and any(p.glob("*model_states.pt")))
        if len(tags) != 1:
            raise CheckpointError(f"{path}: a directory but not a DeepSpeed checkpoint (no 'latest' file and "
                                  f"{len(tags)} folders holding *model_states.pt)")
        tag = tags[0]
    tag_dir = path / tag
    candidates = [tag_dir / "mp_rank_00_model_states.pt", tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    states_file = next((c for c in candidates if c.is_file()), None)
    if states_file is None:
        raise CheckpointError(f"{tag_dir}: no model-states file ({', '.join(c.name for c in candidates)})")
    client = _torch_load(states_file, trusted=True)
    run_config = _run_config(client, states_file)
    zero_stage = None
    if any(tag_dir.glob("*_optim_states.pt")):
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as exc:
            raise CheckpointError(f"{path}: a DeepSpeed ZeRO checkpoint; exporting it needs deepspeed "
                                  f"(`pip install emformer[deepspeed]`): {exc}") from None
        # zero_to_fp32 prints a line per step and two progress bars; keep them for the error message only.
        chatter = io.StringIO()
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError, AssertionError) as exc:
            raise CheckpointError(f"{path}: DeepSpeed could not consolidate the ZeRO shards ({exc}); "
                                  f"its output: {' | '.join(chatter.getvalue().split(chr(10))[-3:])}") from None
        zero_stage = _zero_stage(client)
    elif isinstance(client.get("module"), dict):
        state = client["module"]  # no ZeRO partitions: the full weights are in the model states
    else:
        raise CheckpointError(f"{states_file}: no weights ('module') and no *_optim_states.pt shards beside it")
    return LoadedCheckpoint(path=path, kind="deepspeed", state_dict=_model_weights(state, path), run_config=run_config,
                            step=_step(client), zero_stage=zero_stage)


def _zero_stage(client: dict[str, Any]) -> Optional[int]:
    ds_config = client.get("ds_config")
    try:
        return int(ds_config["zero_optimization"]["stage"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        return None


# ------------------------------------------------------------------------------------------- run files
def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "checkpoints").is_dir() or (path / "config.yaml").is_file()) \
        and not (path / "latest").is_file()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _test_row(model: Any, task: TaskSpec, run: RunConfig, step: Optional[int]) -> dict[str, Any]:
    """The card's figures: the model and the baselines on the run's test set (eval.test_seed), never on the
    eval set the checkpoint was selected on."""
    seed = held_out_test_seed(run)
    metrics = score_model(model, task, run.eval, seed)
    return {"split": "test", "seed": seed, "step": step, "episodes": run.eval.episodes, **metrics}


def _eval_row(run_dir: Path, step: Optional[int]) -> Optional[dict[str, Any]]:
    """The val row of the checkpoint's step, else the final one (DONE, else the last in metrics.jsonl)."""
    rows = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(row, dict) and row.get("split") == "val":
                rows.append(row)
    for row in reversed(rows):
        if step is not None and row.get("step") == step:
            return row
    done = _read_json(run_dir / "DONE")  # {"step", "val": final val row, ...} (train/fit.py)
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


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def input_scale(task: TaskSpec, episodes: int = 256, d: Optional[int] = None) -> float:
    """RMS within-episode standard deviation of one real coordinate of the training points (of the task's
    episodes at dimension d, default the task's own): what a standardized feature is scaled to so user data
    looks like the training episodes (see Clusterer)."""
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


# ------------------------------------------------------------------------------------------- ONNX
class _LogitsOnly(torch.nn.Module):
    """The model's forward with named inputs, for the ONNX graph."""

    def __init__(self, model: ClusterTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, points: torch.Tensor, mask: torch.Tensor, init: torch.Tensor, kmask: torch.Tensor) -> torch.Tensor:
        return self.model(points, mask, init, kmask)


def _example_inputs(architecture: TransformerConfig, batch: int, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    points = torch.randn(batch, n, architecture.d_in, generator=generator) * 2
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[0, n - max(1, n // 5):] = False  # a padded tail, so masking is exercised
    init = torch.randn(batch, architecture.k_max, architecture.d_in, generator=generator) * 2
    kmask = torch.ones(batch, architecture.k_max, dtype=torch.bool)
    return points, mask, init, kmask


def write_onnx(model: ClusterTransformer, architecture: TransformerConfig, path: Path) -> dict[str, Any]:
    """Export with torch.onnx (dynamo), dynamic batch and n; check against torch with onnxruntime at
    several (batch, n) before the file lands at `path`. A mismatch is a CheckpointError."""
    import warnings

    wrapper = _LogitsOnly(model).eval()
    batch_dim, n_dim = torch.export.Dim("batch", min=1), torch.export.Dim("n", min=2)
    dynamic_shapes = {"points": {0: batch_dim, 1: n_dim}, "mask": {0: batch_dim, 1: n_dim},
                      "init": {0: batch_dim}, "kmask": {0: batch_dim}}
    started = time.perf_counter()
    # torch.onnx logs a warning per torchvision op it cannot register; none of them is used here.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, _example_inputs(architecture, 2, 37, seed=0), dynamo=True,
                                        dynamic_shapes=dynamic_shapes, input_names=["points", "mask", "init", "kmask"],
                                        output_names=["logits"], opset_version=ONNX_OPSET, external_data=False,
                                        verbose=False)
    except Exception as exc:  # torch.export raises many types; all mean the graph could not be traced
        raise CheckpointError(f"{path}: torch.onnx.export failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    finally:
        registration_log.setLevel(level)
    proto = program.model_proto.SerializeToString()
    max_diff = _check_onnx(wrapper, architecture, proto, path)
    _publish(path, lambda tmp: tmp.write_bytes(proto))
    return {"opset": ONNX_OPSET, "inputs": ["points [B,n,d_in] float32", "mask [B,n] bool", "init [B,k_max,d_in] float32",
                                            "kmask [B,k_max] bool"],
            "outputs": ["logits [B,n,k_max] float32 (padded clusters -inf)"], "dynamic": ["B", "n"],
            "checked_sizes": [list(size) for size in ONNX_CHECK_SIZES], "max_abs_diff": max_diff,
            "atol": ONNX_ATOL, "rtol": ONNX_RTOL, "export_seconds": round(time.perf_counter() - started, 2)}


def _check_onnx(wrapper: torch.nn.Module, architecture: TransformerConfig, proto: bytes, where: Path) -> float:
    try:
        import onnxruntime
    except ImportError as exc:
        raise CheckpointError(f"--onnx: onnxruntime is needed to verify {where} (`pip install emformer[onnx]`): {exc}") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    worst = 0.0
    for index, (batch, n) in enumerate(ONNX_CHECK_SIZES):
        inputs = _example_inputs(architecture, batch, n, seed=index + 1)
        with torch.inference_mode():
            expected = wrapper(*inputs).numpy()
        feeds = dict(zip(("points", "mask", "init", "kmask"), (t.numpy() for t in inputs)))
        try:
            (got,) = session.run(["logits"], feeds)
        except Exception as exc:  # onnxruntime raises its own error types
            raise CheckpointError(f"{where}: onnxruntime failed at batch={batch}, n={n}: {exc}") from None
        finite = np.isfinite(expected)
        if got.shape != expected.shape or not np.array_equal(finite, np.isfinite(got)):
            raise CheckpointError(f"{where}: ONNX output at batch={batch}, n={n} has shape {got.shape} / padding "
                                  f"pattern unlike torch's {expected.shape}; not written")
        diff = float(np.abs(got[finite] - expected[finite]).max()) if finite.any() else 0.0
        if not np.allclose(got[finite], expected[finite], atol=ONNX_ATOL, rtol=ONNX_RTOL):
            raise CheckpointError(f"{where}: ONNX logits differ from torch by up to {diff:.3g} at batch={batch}, "
                                  f"n={n} (tolerance {ONNX_ATOL} + {ONNX_RTOL}·|x|); not written")
        worst = max(worst, diff)
    return worst


# ------------------------------------------------------------------------------------------- model card
def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _span(lo: Any, hi: Any) -> str:
    return f"{lo}" if hi is None or hi == lo else f"{lo}–{hi}"


def model_card(config: dict[str, Any], where: str = "EXPORT_DIR") -> str:
    task, arch, sup, train = config["task"], config["architecture"], config["supported"], config["training"]
    row = config.get("eval") or {}
    k_range, n_range = _span(task["k"], task.get("k_max")), _span(task["n"], task.get("n_max"))
    sep = _span(task["separation"], task.get("separation_max"))
    lines = [
        f"# emformer model card: {train.get('run_name') or 'exported model'}",
        "",
        "A transformer pre-trained to cluster Gaussian mixtures in context: one forward pass reads n points and "
        "k initial centroids and returns each point's soft assignment (the role of EM's E-step, learned).",
        "",
        "## Trained on",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| clusters k | {k_range} |",
        f"| dimension d | {_span(task.get('d_min') or task['d'], task['d'])}" + (f" (padded to {task['d_max']})" if task.get("d_max") else "") + " |",
        f"| points n | {n_range} |",
        f"| separation Δ (min distance / σ) | {sep} |",
        f"| σ, weights, noise | {task['sigma']}, {task['weights']}, {task['noise']} |",
        f"| initial centroids | {task['init']}" + (f" (ρ = {task['init_noise']})" if task["init"] == "noisy_truth" else "") + " |",
        f"| training step | {train.get('step')} ({train.get('checkpoint_format')} checkpoint"
        + (f", ZeRO-{train['zero_stage']}" if train.get("zero_stage") else "") + ") |",
        f"| commit | {train.get('commit') or 'unknown'} |",
        "",
        f"Architecture: depth {arch['depth']}, heads {arch['heads']}, width {arch['width']}, "
        f"{config['parameters']:,} parameters; inputs of dimension {arch['d_in']}, {arch['k_max']} centroid slots.",
        "",
        "## Supported inputs",
        "",
        f"- k: {_span(2, sup['k']['max'])} (trained on {k_range}); d: {_span(1, sup['d']['max'])} (smaller d is "
        f"zero-padded); n: any n ≥ k (trained on {n_range}; attention memory grows as n²).",
        f"- `standardize=True` (default) centres X and divides all features by one common scale, to a mean "
        f"per-feature spread of {config['input_scale']:.3f} at d = {task['d']} (the training episodes' at X's d, "
        f"config.json's input_scale_by_d), because the model saw "
        f"σ = {task['sigma']} mixtures at the separation above; `standardize=\"features\"` z-scores each feature "
        "(features in unrelated units); `standardize=False` feeds X as it is.",
        (f"- Initial centroids: raw {task['init']} seeds, as in training (no Lloyd iterations); `n_init` draws "
         "several and keeps the best fitted likelihood; `em_steps` polishes the model's assignment with EM; "
         "or pass `init=` your own (k, d) array." if task["init"] in ("kmeans++", "spectral") else
         f"- Initial centroids: k-means++ (or spectral) refined by Lloyd iterations, since the model was trained "
         f"with {task['init']} centroids; or pass `init=` your own (k, d) array."),
        "",
        "## Evaluation" + (f" (test set at step {row.get('step')}: {row.get('episodes', '?')} fresh episodes of "
                           f"eval.test_seed = {row.get('seed')})" if row else ""),
        "",
    ]
    if row:
        lines += ["The checkpoint was selected on the eval set (eval.seed); every figure here is on the separate "
                  "test set, so the selection does not flatter them. Model − EM error: "
                  f"{_fmt(row.get('err', math.nan) - row.get('err_em', math.nan))} ± "
                  f"{_fmt(row.get('err_minus_em_se'))} (paired per-episode standard error).", ""]
    if row:
        em_iters = train["run_config"].get("eval", {}).get("em_iters", "?")
        lines += [
            f"| metric | model | EM ({em_iters} iters, same init) | Lloyd | oracle (true parameters) |",
            "| --- | --- | --- | --- | --- |",
            f"| mis-clustering rate (best permutation) | {_fmt(row.get('err'))} | {_fmt(row.get('err_em'))} | "
            f"{_fmt(row.get('err_lloyd'))} | {_fmt(row.get('err_oracle'))} |",
            f"| mis-clustering rate (anchored to init) | {_fmt(row.get('err_anchored'))} | "
            f"{_fmt(row.get('err_em_anchored'))} | – | {_fmt(row.get('err_oracle_anchored'))} |",
            f"| cross-entropy | {_fmt(row.get('loss'))} | {_fmt(row.get('loss_em'))} | – | {_fmt(row.get('loss_oracle'))} |",
            f"| adjusted Rand index | {_fmt(row.get('ari'))} | – | – | – |",
            "",
        ]
        if row.get("err") is not None and row.get("err_oracle"):
            lines.append(f"Model error / oracle error: {row['err'] / row['err_oracle']:.2f}; "
                         f"model error / EM error: {row['err'] / row['err_em']:.2f}." if row.get("err_em") else
                         f"Model error / oracle error: {row['err'] / row['err_oracle']:.2f}.")
            lines.append("")
    else:
        lines += ["No val row was found for this checkpoint (exported without its run directory).", ""]
    lines += [
        "## Usage",
        "",
        "```python",
        "from emformer import Clusterer",
        f"clusterer = Clusterer.from_pretrained({where!r}, random_state=0"
        + (", n_clusters='auto')" if arch.get("count_head") else ")"),
        "labels = clusterer.fit_predict(X)          # X: (n, d) numpy array",
        "proba = clusterer.predict_proba(X)         # (n, k) soft assignments",
        *(["k_proba = clusterer.predict_k_proba(X)     # P(k | X) from the count head"] if arch.get("count_head") else []),
        "```",
        "",
        f"or `emformer cluster {where} data.csv --out labels.csv`.",
    ]
    if "onnx" in config:
        onnx = config["onnx"]
        lines += [
            "",
            f"`model.onnx` (opset {onnx['opset']}): inputs {', '.join(onnx['inputs'])}; output {onnx['outputs'][0]}; "
            f"batch and n dynamic. Checked against torch with onnxruntime at (batch, n) {onnx['checked_sizes']}: "
            f"max abs diff {onnx['max_abs_diff']:.1e}. Softmax over the first k logits gives the assignment.",
        ]
    return "\n".join(lines) + "\n"
