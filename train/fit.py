"""`emformer train CONFIG [key=value ...] [--run-dir DIR]`: pre-train one transformer (DESIGN §4).

setup (checks: the run dir's config, DONE, hardware, shards) -> build (model, resume check, config + meta,
tracker, trainer) -> fit (Lightning) -> finish (curves, DONE). A run directory
that has DONE is left alone; one that has checkpoints/last.ckpt resumes from it (same optimizer, scheduler,
data-stream position and RNG state). Under DDP Lightning re-executes this command for the other local ranks,
so everything before `trainer.fit` must be safe to run on every rank (only rank 0 writes).

The Lightning Trainer runs the loop, the strategy (DDP, DeepSpeed), precision and the user's callbacks and
loggers (trainer.callbacks / trainer.loggers, train/extensions.py). Its checkpointing, validation loop,
sanity steps, distributed sampler and metric logging are off: train/callbacks.py's RunControl does those
jobs (its module doc says why each one), so that a resume is exact, the step never waits for the device,
and no checkpoint follows a non-finite loss.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import socket
import subprocess
import sys
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from emformer.data.shards import verify_shards
from emformer.errors import ConfigError
from emformer.train import extensions, rundir, strategies
from emformer.train.checkpoints import check_resumable, load_initial_weights, resume_path
from emformer.train.cli import add_config_arguments
from emformer.train.config import (RunConfig, config_hash, differing_keys, load_run_config, run_name, schema_help,
                                   to_dict)
from emformer.train.tracking import Tracker, plot_curves
from emformer.version import __version__

SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME", "SLURM_NODELIST",
              "SLURM_NTASKS", "SLURM_NNODES", "SLURM_RESTART_COUNT", "SLURM_CLUSTER_NAME")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--run-dir", default=None, help="run directory (default: runs/<name>-<confighash>)")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default")
    parser.add_argument("--extend", action="store_true",
                        help="continue the run in --run-dir (finished or not) to the larger trainer.max_steps "
                             "given, from its last checkpoint; CONFIG defaults to the run's config.yaml, and "
                             "trainer.max_steps is the only key that may differ from it")


def run(args: argparse.Namespace) -> int:
    if args.help_config:
        print(schema_help())
        return 0
    if not args.config:
        raise ConfigError("missing CONFIG: e.g. `emformer train configs/debug.yaml` (see --help-config)")
    if args.extend:
        if not args.run_dir:
            raise ConfigError("--extend: give the run to continue with --run-dir DIR")
        config, overrides = args.config, list(args.overrides)
        if config and "=" in config and not Path(config).is_file():  # `--extend trainer.max_steps=N`: no CONFIG
            config, overrides = None, [config, *overrides]
        run_dir = Path(args.run_dir)
        return train(load_run_config(config or rundir.config_path(run_dir), overrides), run_dir, extend=True)
    cfg = load_run_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / run_name(cfg)
    return train(cfg, run_dir)


def is_global_zero() -> bool:
    """Whether this process will be global rank 0, before any process group exists (env set by Lightning's
    launcher for the ranks it starts, by torchrun, or by srun)."""
    if os.environ.get("RANK"):
        return int(os.environ["RANK"]) == 0
    if slurm_launched() and os.environ.get("SLURM_PROCID"):
        return int(os.environ["SLURM_PROCID"]) == 0
    return int(os.environ.get("NODE_RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0


def slurm_launched() -> bool:
    """Whether Lightning takes the ranks from SLURM: its SLURMEnvironment.detect() (SLURM_NTASKS set, the job
    not named bash or interactive), without importing lightning. Under `srun --pty bash` detection is off:
    Lightning starts the local ranks itself, and every one of them inherits SLURM_PROCID=0."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


@dataclasses.dataclass
class Hardware:
    """What setup resolved from trainer.* and the machine."""

    accelerator: str
    precision: str


@dataclasses.dataclass
class Run:
    """Everything build made, for fit and finish."""

    cfg: RunConfig
    run_dir: Path
    is_zero: bool
    module: Any  # ClusterModule
    trainer: Any  # lightning.Trainer
    datamodule: Any  # EpisodeDataModule
    checkpoint: Optional[Path]  # last.ckpt to resume from
    tracker: Tracker
    control: Any  # RunControl


def train(cfg: RunConfig, run_dir: Path, extend: bool = False) -> int:
    """Train (or resume, or skip a finished) run of `cfg` in `run_dir`; 0 when done or preempted. With
    `extend`, a run of the same config but a smaller trainer.max_steps continues to cfg's."""
    run_dir = Path(run_dir)
    is_zero = is_global_zero()
    hardware = setup(cfg, run_dir, is_zero, extend)
    if hardware is None:
        return 0
    run = build(cfg, run_dir, hardware, is_zero)
    exit_code = 1
    try:
        fit(run)
        exit_code = 0
    finally:
        finish(run, exit_code)
    if run.control.preempted:
        if run.trainer.is_global_zero:
            requeue()
        return 0
    if run.trainer.is_global_zero and run.control.last_val:
        _say_done(run)
    return 0


def setup(cfg: RunConfig, run_dir: Path, is_zero: bool, extend: bool = False) -> Optional[Hardware]:
    """Checks before anything is built or written: the run dir's config, DONE, the hardware, the shards.
    None when the run is already finished."""
    # First: a run dir belongs to one config, finished or not (a finished one must not pass for another's).
    if extend:
        _extend(run_dir, cfg, is_zero)
    else:
        _check_same_config(run_dir, cfg)
    if rundir.is_done(run_dir):
        if is_zero:
            print(f"emformer train: {run_dir} is finished (DONE); nothing to do")
        return None
    accelerator = strategies.resolve_accelerator(str(cfg.trainer.accelerator))
    precision = strategies.resolve_precision(str(cfg.trainer.precision), accelerator)
    strategies.check_devices(int(cfg.trainer.devices), accelerator)
    _check_data(cfg)
    if int(cfg.trainer.threads) > 0:
        torch.set_num_threads(int(cfg.trainer.threads))
    if accelerator == "cpu" and is_zero:
        hint = oversubscription_hint(torch.get_num_threads(), int(cfg.trainer.devices), strategies.usable_cores(),
                                     os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
        if hint:
            print(f"emformer train: {hint}", file=sys.stderr, flush=True)
    return Hardware(accelerator, precision)


def oversubscription_hint(threads: int, processes: int, cores: int, load: float) -> Optional[str]:
    """One line when the run's CPU threads (threads per process x processes) exceed the cores that other
    work leaves free (cores minus the 1-minute load average): oversubscribed threads wait on each other,
    and a step then costs several times what it costs with fewer threads. None otherwise."""
    free = max(1, int(round(cores - load)))
    if threads * processes <= free:
        return None
    fit = free // max(1, processes)
    advice = f"trainer.threads={fit} fits" if threads > 1 and fit >= 1 else \
        "fewer processes (trainer.devices) or fewer other jobs would fit"
    return (f"{threads} thread(s) x {processes} process(es) exceed the ~{free} free core(s) of this machine "
            f"({cores} cores, load {load:.1f}); oversubscribed threads slow every step: {advice}")


def build(cfg: RunConfig, run_dir: Path, hardware: Hardware, is_zero: bool) -> Run:
    """The model (checked against a checkpoint to resume), the run dir's config and meta, the tracker and
    the Lightning trainer with its callbacks."""
    _quiet_lightning()
    # Heavy (lightning), so imported once the run is known to train: a finished run and --help-config answer
    # at once. The three modules below import lightning.
    import lightning as L

    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import Logger

    from emformer.data.datamodule import EpisodeDataModule
    from emformer.train.callbacks import Preemption, RunControl, StepProgress
    from emformer.train.module import ClusterModule

    # The user's callbacks and loggers first: a bad class path fails before the run dir is touched.
    callbacks = extensions.instantiate(cfg.trainer.callbacks, "trainer.callbacks", Callback)
    loggers = extensions.instantiate(cfg.trainer.loggers, "trainer.loggers", Logger, run_dir=run_dir)
    config = to_dict(cfg)
    L.seed_everything(int(cfg.trainer.seed), workers=True, verbose=False)
    module = ClusterModule(config)
    params = module.model.num_parameters()
    checkpoint = resume_path(run_dir)
    resumed_from = check_resumable(checkpoint, module.model) if checkpoint is not None else None
    initial = None
    if checkpoint is None and cfg.trainer.init_from:  # a resumed run has its own weights already
        loaded = load_initial_weights(cfg.trainer.init_from, module.model)
        initial = {"path": str(loaded.path), "step": loaded.step}
    meta = _meta(run_dir, params, resumed_from, hardware, cfg, initial)
    if is_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_config(run_dir, cfg)
        rundir.write_meta(run_dir, meta)
        where = (f"resuming from step {resumed_from}" if resumed_from is not None
                 else f"weights from {initial['path']} (step {initial['step']})" if initial else "from scratch")
        print(f"emformer train: {run_dir} ({where}): {params:,} parameters, {hardware.accelerator} x "
              f"{int(cfg.trainer.devices) * int(cfg.trainer.num_nodes)}, strategy {cfg.strategy.name}, "
              f"precision {hardware.precision}", file=sys.stderr, flush=True)

    tracker = Tracker(run_dir, dict(config["wandb"]), config, name=run_dir.name, meta=meta, loggers=loggers) \
        if is_zero else Tracker.null()
    preemption = Preemption()
    preemption.install()
    control = RunControl(run_dir, cfg, tracker, preemption)
    progress = StepProgress(int(cfg.trainer.max_steps), enabled=bool(cfg.trainer.progress) and is_zero)
    trainer = L.Trainer(
        accelerator=hardware.accelerator, devices=int(cfg.trainer.devices), num_nodes=int(cfg.trainer.num_nodes),
        strategy=strategies.build_strategy(cfg, hardware.accelerator), precision=hardware.precision,
        max_steps=int(cfg.trainer.max_steps), max_epochs=-1,
        gradient_clip_val=float(cfg.optim.grad_clip) or None, gradient_clip_algorithm="norm",
        callbacks=[progress, control, *callbacks], plugins=_slurm_plugins(),
        logger=loggers or False, log_every_n_steps=int(cfg.trainer.log_every), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
        deterministic=False, default_root_dir=str(run_dir),
    )
    datamodule = EpisodeDataModule(cfg.task, cfg.data, keys=module.step_keys)
    return Run(cfg, run_dir, is_zero, module, trainer, datamodule, checkpoint, tracker, control)


def fit(run: Run) -> None:
    """Lightning's fit, from last.ckpt when there is one (a DeepSpeed checkpoint directory holds pickled
    DeepSpeed objects, so it cannot be read weights-only)."""
    checkpoint = run.checkpoint
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=str(checkpoint) if checkpoint else None,
                    weights_only=False if checkpoint is not None and checkpoint.is_dir() else True)


def finish(run: Run, exit_code: int) -> None:
    """On rank 0: the curves plot, DONE when the run reached max_steps (not when preempted or failed), and
    the tracker's summary."""
    trainer, control, run_dir = run.trainer, run.control, run.run_dir
    if not trainer.is_global_zero:
        return
    curves = plot_curves(run_dir, rundir.curves_path(run_dir)) if exit_code == 0 else None
    finished = exit_code == 0 and not control.preempted and trainer.global_step >= int(run.cfg.trainer.max_steps)
    if finished:
        rundir.write_done(run_dir, {"step": trainer.global_step, "val": control.last_val,
                                    "finished_at": _now(), "run_dir": str(run_dir)})
    run.tracker.finish(control.last_val if finished else None, curves, exit_code=exit_code)


def _say_done(run: Run) -> None:
    val = run.control.last_val
    print(f"emformer train: done at step {run.trainer.global_step}: val loss {val['loss']:.4f}, err "
          f"{val['err']:.4f} (anchored {val['err_anchored']:.4f}); EM {val.get('err_em', float('nan')):.4f} "
          f"(anchored {val.get('err_em_anchored', float('nan')):.4f}), oracle "
          f"{val.get('err_oracle', float('nan')):.4f} -> {run.run_dir}", file=sys.stderr)


def requeue() -> None:
    """`scontrol requeue` this job (array task aware) when running under SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        print("emformer train: not running under SLURM (no SLURM_JOB_ID): requeue skipped; run the same "
              "command again to resume from checkpoints/last.ckpt", file=sys.stderr, flush=True)
        return
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    # Said before the call: SLURM may end this step while scontrol is still returning, and the line
    # would be lost with it.
    print(f"emformer train: job {job} being requeued (scontrol requeue): it resumes from checkpoints/last.ckpt",
          file=sys.stderr, flush=True)
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"emformer train: job {job}: requeue failed: {result.stderr.strip()}", file=sys.stderr, flush=True)


def _slurm_plugins() -> Optional[list[Any]]:
    """Under SLURM, Lightning's environment without its own auto-requeue: our SIGUSR1 handler owns it."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment  # lightning loads in build (see there)

    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return None


def _check_data(cfg: RunConfig) -> None:
    """Shards that disagree with the config fail here, before the run dir is touched (verification is cached
    per process, so the stream does not hash the shards a second time)."""
    if str(cfg.data.source) != "shards":
        return
    manifest = verify_shards(str(cfg.data.shards_dir), cfg.task)
    held_out = {"eval.seed": int(cfg.eval.seed), "eval.test_seed": int(cfg.eval.test_seed)}
    for key, seed in held_out.items():
        if int(manifest["seed"]) == seed:
            raise ConfigError(f"{cfg.data.shards_dir}/manifest.json: the shards were generated with seed {seed}, "
                              f"which is {key}: training on them would train on the held-out episodes; "
                              f"regenerate them with another --seed")


def _check_same_config(run_dir: Path, cfg: RunConfig) -> None:
    """A run dir belongs to one config: refuse to continue it with a different one (nothing overwritten)."""
    saved = rundir.config_path(run_dir)
    if not saved.is_file():
        return
    try:
        old = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{saved}: unreadable ({exc}); move the run dir away or fix the file") from None
    if config_hash(old) != config_hash(cfg):
        changed = differing_keys(old, cfg)
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise ConfigError(f"{run_dir} holds a run of a different config (hash {config_hash(old)}, this one "
                          f"{config_hash(cfg)}; {shown or 'the episodes version differs'}); use another "
                          "--run-dir, or the same config to resume")


def _extend(run_dir: Path, cfg: RunConfig, is_zero: bool) -> None:
    """--extend: the run dir holds this config but for a smaller trainer.max_steps and has a checkpoint to
    continue from; its DONE goes, so the run trains on to cfg's max_steps (exactly the steps a run started
    with that max_steps would take, as long as the old max_steps is within optim.warmup_steps: the cosine
    decay after warmup is stretched to the new end from the step it continues at)."""
    saved = rundir.config_path(run_dir)
    if not saved.is_file():
        raise ConfigError(f"--extend: {run_dir} has no {rundir.CONFIG}: no run to extend there")
    old = rundir.read_config(run_dir)
    other = [change for change in differing_keys(old, cfg) if not change.startswith("trainer.max_steps:")]
    if other:
        raise ConfigError(f"--extend: only trainer.max_steps may change, but these differ from {saved}: "
                          f"{'; '.join(other)}")
    before, after = int(old.get("trainer", {}).get("max_steps", 0)), int(cfg.trainer.max_steps)
    if after < before:
        raise ConfigError(f"--extend: trainer.max_steps={after} is below the run's {before}: give a larger one")
    if resume_path(run_dir) is None:
        raise ConfigError(f"--extend: {run_dir} has no checkpoint to continue from (checkpoints/last.ckpt)")
    if is_zero and after > int(rundir.read_done(run_dir).get("step", after)):
        rundir.clear_done(run_dir)


def _meta(run_dir: Path, params: int, resumed_from: Optional[int], hardware: Hardware,
          cfg: RunConfig, initial: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    import lightning  # heavy: loaded by build already, only for a run that trains (see there)

    previous = rundir.read_meta(run_dir)
    starts = list(previous.get("starts", []))
    starts.append({"time": _now(), "step": resumed_from or 0, "host": socket.gethostname(),
                   "slurm_job_id": os.environ.get("SLURM_JOB_ID")})
    versions = {"emformer": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "lightning": lightning.__version__}
    for name in ("deepspeed", "wandb", "omegaconf", "numpy"):
        versions[name] = _dist_version(name)
    return {
        "run_name": run_dir.name, "config_hash": config_hash(cfg), "git_commit": _git_commit(),
        "param_count": params, "host": socket.gethostname(), "platform": platform.platform(),
        "accelerator": hardware.accelerator, "devices": int(cfg.trainer.devices),
        "num_nodes": int(cfg.trainer.num_nodes),
        "strategy": str(cfg.strategy.name), "precision": hardware.precision, "versions": versions,
        "slurm": {key: os.environ[key] for key in SLURM_KEYS if key in os.environ},
        "created_at": previous.get("created_at", _now()), "starts": starts, "argv": sys.argv,
        "init_from": initial or previous.get("init_from"),
    }


def _dist_version(name: str) -> Optional[str]:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    """HEAD of the source checkout (where the package lives), if it is a git checkout."""
    source = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _quiet_lightning() -> None:
    """Lightning's advice about workers, iterable datasets and tips does not apply to this stream."""
    for pattern in (".*does not have many workers.*", ".*IterableDataset.*", ".*LeafSpec.*",
                    ".*train_dataloader.*", ".*Total length of.*", ".*torch.cuda.amp.*", ".*treespec.*",
                    ".*could not determine.*", ".*srun.*", ".*Checkpoint directory.*", ".*_pytree.*",
                    ".*all_gather_into_tensor.*"):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.accelerators.cuda").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
