"""The model card (README.md of an export), rendered from model_card.md.j2 with config.json's contents."""
from __future__ import annotations

import collections
import math
from pathlib import Path
from typing import Any, Optional

import jinja2
import torch

from emformer.models.calibration import CALIBRATED_ECE_PERCENTILE
from emformer.models.export_format import CONFIG_FILE, count_posterior

TEMPLATE = Path(__file__).with_name("model_card.md.j2")
FLOOR_AT = (32, 256, 1024)
"""the n at which the card gives the floor of the BIC's vote in P(k | X)"""


def _fmt(value: Any) -> str:
    if value is None or isinstance(value, jinja2.Undefined) or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _span(lo: Any, hi: Any) -> str:
    return f"{lo}" if hi is None or hi == lo else f"{lo}–{hi}"


def _lenient(values: dict[str, Any] | None) -> collections.defaultdict:
    """A dict whose absent keys read as None in the template (config.json's optional fields)."""
    return collections.defaultdict(lambda: None, values or {})


def model_card(config: dict[str, Any], where: str = "EXPORT_DIR") -> str:
    """README.md of the export whose config.json is `config`, for an export directory named `where`."""
    task, train = _lenient(config["task"]), config["training"]
    row = _lenient(config.get("eval"))
    run_eval = train["run_config"].get("eval", {})
    err, err_em = (math.nan if row[key] is None else row[key] for key in ("err", "err_em"))
    env = jinja2.Environment(keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters.update(fmt=_fmt, pyrepr=repr)
    template = env.from_string(TEMPLATE.read_text())
    return template.render(
        task=task, arch=_lenient(config["architecture"]), supported=config["supported"], train=_lenient(train),
        row=row if config.get("eval") else None, onnx=config.get("onnx"), where=where,
        parameters=f"{config['parameters']:,}", input_scale=config["input_scale"],
        k_range=_span(task["k"], task["k_max"]), n_range=_span(task["n"], task["n_max"]),
        separation=_span(task["separation"], task["separation_max"]), span=_span,
        err_minus_em=err - err_em, em_iters=run_eval.get("em_iters", "?"),
        defaults=", ".join(f"{key}={value}" for key, value in (config.get("clusterer_defaults") or {}).items()),
        count=config.get("count_head"), floors=_bic_floors(config), calibrated_pct=CALIBRATED_ECE_PERCENTILE,
        default_passes=int((config.get("clusterer_defaults") or {}).get("n_passes",
                                                                        config["architecture"].get("passes", 1))),
    )


def _bic_floors(config: dict[str, Any]) -> Optional[str]:
    """The floor of the BIC's vote in P(k | X) at a few n ("ε(32) = 0.12, ..."), None without the BIC."""
    posterior = count_posterior(config, CONFIG_FILE)
    if not posterior.uses_bic:
        return None
    return ", ".join(f"ε({n}) = {float(posterior.floor(torch.tensor(float(n)))):.2f}" for n in FLOOR_AT)