"""Where a run's numbers go: the run's metrics log always, wandb when asked, every Lightning logger of
trainer.loggers (each row at its step), and a curves plot at the end.

Only global rank 0 writes (the callers check). The metrics log (rundir.MetricsLog) is append-only, one JSON
object per line, flushed per row so a killed run loses nothing it had logged; on resume rows after the
restored step are dropped (the file is rewritten atomically), so a step never appears twice. wandb runs
offline by default (no network here), keeps its files under `<run_dir>/wandb/` and reuses the id stored in
`<run_dir>/wandb_id`, so a requeued job continues the same wandb run.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Optional, Sequence

from emformer.atomic import atomic_write_text
from emformer.train.rundir import WANDB_ID, MetricsLog, read_metrics


class WandbRun:
    """A wandb run in `<run_dir>/wandb/`, resumable via `<run_dir>/wandb_id`. mode: offline|online|disabled."""

    def __init__(self, run_dir: Path, wandb_cfg: dict[str, Any], config: dict[str, Any], name: str,
                 meta: Optional[dict[str, Any]] = None) -> None:
        self.run: Any = None
        self.mode = str(wandb_cfg.get("mode", "offline"))
        if self.mode == "disabled":
            return  # nothing written, wandb not even imported
        os.environ["WANDB_DIR"] = str(run_dir)
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        id_file = Path(run_dir) / WANDB_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(4)
            atomic_write_text(id_file, run_id + "\n")
        (Path(run_dir) / "wandb").mkdir(parents=True, exist_ok=True)
        meta = meta or {}
        self.run = wandb.init(
            project=wandb_cfg.get("project") or "emformer", entity=wandb_cfg.get("entity"),
            group=wandb_cfg.get("group"), tags=list(wandb_cfg.get("tags") or []), name=name, id=run_id,
            resume="allow", mode=self.mode, dir=str(run_dir),
            config={**config, "git_commit": meta.get("git_commit"), "param_count": meta.get("param_count")},
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        # Plots in the wandb UI against the training step, whatever order rows arrive in.
        self.run.define_metric("train/*", step_metric="step")
        self.run.define_metric("val/*", step_metric="step")

    def log(self, row: dict[str, Any]) -> None:
        if self.run is None:
            return
        payload: dict[str, Any] = {**numeric_fields(row), "step": row["step"]}
        self.run.log(payload)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def log_image(self, key: str, path: Path) -> None:
        if self.run is not None and Path(path).is_file():
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def numeric_fields(row: dict[str, Any]) -> dict[str, float]:
    """A row's numbers as `split/key` (what wandb and Lightning's loggers receive)."""
    split = row.get("split", "train")
    return {f"{split}/{key}": value for key, value in row.items()
            if key not in ("step", "split") and isinstance(value, (int, float)) and value is not None}


class Tracker:
    """The metrics log + wandb + the configured Lightning loggers (trainer.loggers) behind one `log(row)`;
    rank 0 creates it, other ranks use `Tracker.null()`."""

    def __init__(self, run_dir: Path, wandb_cfg: Optional[dict[str, Any]] = None,
                 config: Optional[dict[str, Any]] = None, name: str = "run",
                 meta: Optional[dict[str, Any]] = None, enabled: bool = True,
                 loggers: Sequence[Any] = ()) -> None:
        self.enabled = enabled
        self.loggers = list(loggers)
        self.run_dir = Path(run_dir)
        self.metrics = MetricsLog(self.run_dir)
        self._wandb_args = (wandb_cfg or {"mode": "disabled"}, config or {}, name, meta)
        self.wandb: Optional[WandbRun] = None

    @classmethod
    def null(cls) -> "Tracker":
        return cls(Path("."), enabled=False)

    def start(self, step: int) -> None:
        """Called once training state is restored: drop rows after `step`, open wandb."""
        if not self.enabled:
            return
        # A fresh start (step 0: no checkpoint) logs its step-0 row again, so rows of an earlier attempt
        # that crashed before its first checkpoint go too.
        self.metrics.truncate_after(step if step > 0 else -1)
        if self.wandb is None:
            wandb_cfg, config, name, meta = self._wandb_args
            self.wandb = WandbRun(self.run_dir, wandb_cfg, config, name, meta)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.metrics.append(row)
        if self.wandb is not None:
            self.wandb.log(row)
        for logger in self.loggers:
            logger.log_metrics(numeric_fields(row), step=int(row["step"]))

    def finish(self, final_row: Optional[dict[str, Any]] = None, curves: Optional[Path] = None,
               exit_code: int = 0) -> None:
        if not self.enabled:
            return
        self.metrics.close()
        for logger in self.loggers:
            logger.save()
        if self.wandb is not None:
            if final_row:
                self.wandb.summary({f"final/{k}": v for k, v in final_row.items() if isinstance(v, (int, float))})
            if curves is not None:
                self.wandb.log_image("curves", curves)
            self.wandb.finish(exit_code)


def plot_curves(run_dir: str | os.PathLike, out_path: str | os.PathLike) -> Optional[Path]:
    """From the run's metrics: loss (train, val, train-set eval) and error (model vs EM / Lloyd / oracle) against step, as a PNG."""
    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("split") == "train" and r.get("loss") is not None]
    val = [r for r in rows if r.get("split") == "val" and r.get("loss") is not None]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, alpha=0.7, label="train")
    if val:
        steps = [r["step"] for r in val]
        ax_loss.plot(steps, [r["loss"] for r in val], "o-", ms=3, label="val")
        if all(r.get("train_loss") is not None for r in val):
            ax_loss.plot(steps, [r["train_loss"] for r in val], "s--", ms=3, label="train set")
        if val[-1].get("loss_em") is not None:
            ax_loss.axhline(val[-1]["loss_em"], color="gray", ls=":", label="EM")
        if val[-1].get("loss_oracle") is not None:
            ax_loss.axhline(val[-1]["loss_oracle"], color="black", ls="-", lw=0.8, label="oracle")
        for key, style in (("err", {"marker": "o"}), ("err_anchored", {"marker": "^"}), ("err_em", {"ls": "--"}),
                           ("err_em_anchored", {"ls": "-."}), ("err_lloyd", {"ls": ":"}),
                           ("err_init", {"ls": (0, (1, 3)), "color": "gray"}), ("err_oracle", {"color": "black"})):
            if all(r.get(key) is not None for r in val):
                values = [r[key] for r in val]
                ax_err.plot(steps, values, ms=3, lw=1, label=key.replace("err_", "") if key != "err" else "model",
                            **style)
        ax_err.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend(fontsize=7)
    ax_err.set_xlabel("step")
    ax_err.set_ylabel("mis-clustering rate (val)")
    ax_err.legend(fontsize=7)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path
