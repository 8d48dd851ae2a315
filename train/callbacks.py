"""What happens at the end of each training step, in this order (DESIGN §4, §6):

1. the step's loss is added to sums kept on the device: nothing in a step waits for the device or for
   another rank. At a *check point* -- a train row (every `log_every` steps), a val row, a checkpoint, the
   last step, or a preemption request -- one small tensor (loss sum, non-finite count, preemption flag)
   goes to the host, after one all-reduce under DDP. A non-finite loss on any rank
   then stops every rank with a clear error before anything is saved, so no checkpoint ever follows a
   non-finite loss; a SIGUSR1 on any rank asks for preemption (one process acts on it at the step it lands;
   under DDP ranks agree at the next check point, at most `log_every` steps later, so no rank ever waits in
   a collective that the others skip); a checkpoint is only written when every parameter is finite (one
   sync for all of them), so `last` is always a good one;
2. a train row every `log_every` steps (loss averaged over ranks and steps, lr, throughput; peak device
   memory on a GPU);
3. a val row every `val_every` steps and at the end (every rank evaluates; rank 0 writes), `best` on
   improvement of the val loss;
4. `last` every `ckpt_every` steps, at the end, and on preemption (then training stops, without DONE);
5. the EMFORMER_CRASH_AT_STEP test hook (os._exit(1) after step S and its checkpoint).

The callback also carries the RNG states and the best val loss through checkpoints.

Which of Lightning's own features RunControl stands in for, and why they are switched off in train/fit.py:
- ModelCheckpoint: `last` must never follow a non-finite loss or hold a non-finite parameter, and it is
  written atomically with the data-stream position, so a resume is exact; ModelCheckpoint saves whatever
  the step left.
- Lightning's logging (`self.log`, the logger connector): rows are reduced on the device and reach the host
  only at check points, and on resume rows after the restored step are trimmed from metrics.jsonl, so no
  step is logged twice; `self.log` syncs per call and cannot trim. The configured Lightning loggers
  (trainer.loggers) still receive every row, through the Tracker.
- The validation loop and sanity steps: evaluation runs on a fixed eval set with the EM / Lloyd / oracle
  baselines on the same episodes, in the step that the row belongs to.
- The distributed sampler: the stream splits itself by rank and worker (data/stream.py).
User callbacks (trainer.callbacks) run beside it with Lightning's usual hooks.
"""
from __future__ import annotations

import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from emformer.errors import EmformerError
from emformer.train.checkpoints import save_atomic
from emformer.train.config import RunConfig
from emformer.train.rundir import BEST, LAST, checkpoint_dir, write_episode_results
from emformer.train.tracking import Tracker

CRASH_ENV = "EMFORMER_CRASH_AT_STEP"


class NonFiniteLoss(EmformerError):
    """The training loss (or a parameter) became NaN or infinite: training diverged."""


class Preemption:
    """Set from a signal handler; acted on at the next step end (the handler itself does nothing else)."""

    def __init__(self) -> None:
        self.requested = threading.Event()

    def install(self) -> None:
        import signal

        if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, lambda signum, frame: self.requested.set())


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain containers (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # A requeued job may land on a node that shows fewer GPUs than the one that saved: restore the
        # devices this process sees (set_rng_state_all would raise for the missing ones).
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


class RunControl(Callback):
    """Logging, evaluation, checkpoints, preemption and the crash hook (see the module doc)."""

    def __init__(self, run_dir: Path, config: RunConfig, tracker: Tracker,
                 preemption: Optional[Preemption] = None) -> None:
        self.run_dir = Path(run_dir)
        self.trainer_cfg = config.trainer
        self.tokens_per_episode = config.task.n_pad + config.task.k_pad
        self.batch_size = config.data.batch_size
        self.tracker = tracker
        self.preemption = preemption or Preemption()
        self.best_loss = float("inf")
        self.last_val: Optional[dict[str, Any]] = None
        self.preempted = False
        self._pending_rng: Optional[dict[str, Any]] = None
        self._crash_at = int(os.environ[CRASH_ENV]) if os.environ.get(CRASH_ENV) else None
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        self._loss_count = 0
        self._rank_loss_sums: Optional[torch.Tensor] = None  # every rank's _loss_sum, gathered when saving
        # On the device, like _loss_sum: how many steps had a non-finite loss, and the first such step.
        self._bad_count = torch.zeros((), dtype=torch.float64)
        self._first_bad = torch.full((), float("inf"), dtype=torch.float64)
        self._window_start = 0.0
        self._window_steps = 0
        self._excluded = 0.0  # seconds of eval / checkpointing inside the current window

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        # The open window of the train-loss average too: a run preempted between two train rows logs the
        # same mean at the next row as an uninterrupted run would. The checkpoint holds rank 0's callback
        # state only, so every rank's sum goes in (gathered by _save).
        return {"best_loss": self.best_loss, "rng": rng_state(), "last_val": self.last_val,
                "loss_window": {"sum": self._loss_sum.detach().cpu().clone(), "count": self._loss_count,
                                "rank_sums": self._rank_loss_sums}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss = float(state.get("best_loss", float("inf")))
        self.last_val = state.get("last_val")
        window = state.get("loss_window")
        if window is not None:
            self._loss_sum, self._loss_count = window["sum"].clone(), int(window["count"])
            self._rank_loss_sums = window.get("rank_sums")  # this rank's share is taken in on_train_start
        # Applied just before the next training step: Lightning draws from the RNG while it sets up.
        self._pending_rng = state.get("rng")

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        step = trainer.global_step
        self._schedule_to_max_steps(trainer)
        if trainer.is_global_zero:
            self.tracker.start(step)
        if self._rank_loss_sums is not None:
            sums = self._rank_loss_sums
            # Resumed on as many ranks: each its own sum; on another number, each the mean (same logged mean).
            self._loss_sum = (sums[trainer.global_rank] if len(sums) == trainer.world_size else sums.mean()).clone()
            self._rank_loss_sums = None
        if step == 0:
            # The untrained model next to the baselines: the first point of every curve.
            self._validate(trainer, module, step)
        self._window_start = time.perf_counter()
        self._window_steps, self._excluded = 0, 0.0

    def _schedule_to_max_steps(self, trainer: L.Trainer) -> None:
        """A restored lr schedule keeps the max_steps it was made with (LambdaLR's state holds it); a run
        continued to a larger trainer.max_steps (`emformer train --extend`) decays to the new end instead."""
        for config in trainer.lr_scheduler_configs:
            for schedule in getattr(config.scheduler, "lr_lambdas", ()):
                if hasattr(schedule, "max_steps"):
                    schedule.max_steps = int(self.trainer_cfg.max_steps)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        cfg = self.trainer_cfg
        loss = (outputs["loss"] if isinstance(outputs, dict) else outputs).detach().double()
        self._accumulate(loss, step)
        self._loss_count += 1
        self._window_steps += 1

        done = step >= cfg.max_steps
        logging = step % cfg.log_every == 0 or done
        validating = step % cfg.val_every == 0 or done
        saving = step % cfg.ckpt_every == 0 or done
        preempt = self.preemption.requested.is_set()
        if not (logging or validating or saving or (preempt and trainer.world_size == 1)):
            self._crash_hook(step)
            return  # not a check point: no host sync, no collective
        loss_sum, bad_count, preempt_any = self._agree_values(trainer, self._loss_sum, self._bad_count, float(preempt))
        preempt = preempt_any > 0
        if bad_count > 0:
            last = checkpoint_dir(self.run_dir) / LAST
            kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written"
            first = float(self._first_bad)  # the error path: one more sync does not matter
            where = f"from step {int(first)}" if first != float("inf") else "on another rank"
            raise NonFiniteLoss(f"training loss is nan or infinite {where} (found at step {step}): stopping "
                                f"({kept}); try a lower optim.lr or optim.grad_clip")
        saving = saving or preempt
        if logging:
            self._log_train(trainer, loss_sum / max(self._loss_count * trainer.world_size, 1))
        started = time.perf_counter()
        if validating:
            self._validate(trainer, module, step, final=done)
        if saving:
            self._save(trainer, module, LAST, step)
        self._excluded += time.perf_counter() - started
        if preempt and not done:
            self.preempted = True
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(f"emformer train: preempted at step {step}: saved {checkpoint_dir(self.run_dir) / LAST}",
                      file=sys.stderr, flush=True)
        self._crash_hook(step)

    def _crash_hook(self, step: int) -> None:
        if self._crash_at is not None and step == self._crash_at:
            self.tracker.metrics.close()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

    # ------------------------------------------------------------------ pieces
    def _accumulate(self, loss: torch.Tensor, step: int) -> None:
        """Add this step's loss to the device-side sums (elementwise ops only: the host does not wait)."""
        if self._loss_sum.device != loss.device:  # first step, or just resumed from a CPU checkpoint
            self._loss_sum = self._loss_sum.to(loss.device)
            self._bad_count = self._bad_count.to(loss.device)
            self._first_bad = self._first_bad.to(loss.device)
        bad = ~torch.isfinite(loss)
        self._loss_sum += loss
        self._bad_count += bad.double()
        self._first_bad = torch.where(bad, self._first_bad.clamp(max=step), self._first_bad)

    def _agree_values(self, trainer: L.Trainer, *values: torch.Tensor | float) -> list[float]:
        """Each value summed over ranks: one all-reduce (none on a single process), one copy to the host."""
        device = trainer.strategy.root_device
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device).reshape(()) for v in values])
        if trainer.world_size > 1:
            stacked = trainer.strategy.reduce(stacked, reduce_op="sum")
        return stacked.tolist()

    def _agree(self, trainer: L.Trainer, *flags: bool | torch.Tensor) -> list[bool]:
        """Any-rank OR of each flag, with one all-reduce (or none on a single process)."""
        return [v > 0 for v in self._agree_values(trainer, *(torch.as_tensor(f).double() for f in flags))]

    def _save(self, trainer: L.Trainer, module: L.LightningModule, name: str, step: int) -> None:
        """Write checkpoints/<name> unless a parameter is non-finite on some rank (then stop, keeping the old)."""
        params = [p.detach() for p in module.parameters()]
        bad = ~torch.stack([torch.isfinite(p).all() for p in params]).all() if params else torch.tensor(False)
        if self._agree(trainer, bad)[0]:
            path = checkpoint_dir(self.run_dir) / name
            kept = f"{path} from an earlier step is kept" if path.exists() else f"{path} was never written"
            raise NonFiniteLoss(f"parameters became NaN or infinite by step {step}: stopping without saving "
                                f"({kept}); try a lower optim.lr or optim.grad_clip")
        if trainer.world_size > 1:  # a gather as a sum: each rank fills its own slot, x + 0.0 is exact
            sums = torch.zeros(trainer.world_size, dtype=torch.float64, device=trainer.strategy.root_device)
            sums[trainer.global_rank] = self._loss_sum
            self._rank_loss_sums = trainer.strategy.reduce(sums, reduce_op="sum").cpu()
        save_atomic(trainer, checkpoint_dir(self.run_dir) / name)
        self._rank_loss_sums = None

    def _log_train(self, trainer: L.Trainer, mean: float) -> None:
        """One train row; `mean` is the window's loss averaged over its steps and the ranks."""
        step = trainer.global_step
        elapsed = max(time.perf_counter() - self._window_start - self._excluded, 1e-9)
        episodes_per_s = self._window_steps * self.batch_size * trainer.world_size / elapsed
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        row = {"step": step, "split": "train", "loss": float(mean), "lr": float(lr),
               "episodes_per_s": episodes_per_s, "tokens_per_s": episodes_per_s * self.tokens_per_episode,
               "s_per_step": elapsed / max(self._window_steps, 1)}
        device = trainer.strategy.root_device
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        if trainer.is_global_zero:
            self.tracker.log(row)
        self._progress_update(trainer, loss=float(mean))
        self._loss_sum = torch.zeros_like(self._loss_sum)
        self._loss_count = 0
        self._window_start = time.perf_counter()
        self._window_steps, self._excluded = 0, 0.0

    def _validate(self, trainer: L.Trainer, module: L.LightningModule, step: int, final: bool = False) -> None:
        values = module.evaluate()  # type: ignore[operator]
        row = {"step": step, "split": "val", **values}
        self.last_val = row
        # The per-episode figures behind the final row, for intervals that resample episodes. Every rank makes
        # them: a model trained to iterate runs its passes once more there, and a sharded model (ZeRO-3)
        # gathers its parameters from all ranks for a forward.
        episodes = module.episode_results() if final else None  # type: ignore[operator]
        if trainer.is_global_zero:
            self.tracker.log(row)
            if episodes is not None:
                write_episode_results(self.run_dir, episodes, step, int(module.run_config.eval.seed))
        self._progress_update(trainer, val_err=values["err"])
        # Every rank computed the same numbers; rank 0's decision is broadcast so ranks cannot disagree.
        improved = bool(trainer.strategy.broadcast(values["loss"] < self.best_loss and step > 0))
        if improved:
            self.best_loss = values["loss"]
            self._save(trainer, module, BEST, step)

    def _progress_update(self, trainer: L.Trainer, **values: float) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, StepProgress):
                callback.show(**values)


class StepProgress(Callback):
    """A console progress bar over steps (rank 0): step / max_steps, loss, val err."""

    def __init__(self, max_steps: int, enabled: bool = True) -> None:
        self.max_steps = max_steps
        self.enabled = enabled
        self.bar: Any = None
        self.values: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.enabled and trainer.is_global_zero:
            from tqdm import tqdm

            self.bar = tqdm(total=self.max_steps, initial=trainer.global_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=0.5, desc="train")

    def show(self, **values: float) -> None:
        self.values.update(values)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in self.values.items()}, refresh=False)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.bar is not None:
            self.bar.update(trainer.global_step - self.bar.n)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.close()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
