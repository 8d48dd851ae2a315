"""The ONNX step of `emformer export`: torch.onnx (dynamo) with dynamic batch and n, checked against torch
with onnxruntime at several (batch, n) before model.onnx is written.

Inputs points [B,n,d_in] f32, mask [B,n] bool, init [B,k_max,d_in] f32, kmask [B,k_max] bool -> logits
[B,n,k_max] (padded clusters -inf). onnxruntime is imported only here, when --onnx asks for it.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emformer.errors import CheckpointError
from emformer.models.export_format import publish
from emformer.models.transformer import ClusterTransformer, TransformerConfig

ONNX_CHECK_SIZES = ((1, 17), (3, 64), (2, 300))  # (batch, n) pairs checked against torch at export time
ONNX_ATOL = 1e-4
ONNX_RTOL = 1e-4
ONNX_OPSET = 18


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
    publish(path, lambda tmp: tmp.write_bytes(proto))
    return {"opset": ONNX_OPSET, "inputs": ["points [B,n,d_in] float32", "mask [B,n] bool", "init [B,k_max,d_in] float32",
                                            "kmask [B,k_max] bool"],
            "outputs": ["logits [B,n,k_max] float32 (padded clusters -inf)"], "dynamic": ["B", "n"],
            "checked_sizes": [list(size) for size in ONNX_CHECK_SIZES], "max_abs_diff": max_diff,
            "atol": ONNX_ATOL, "rtol": ONNX_RTOL, "export_seconds": round(time.perf_counter() - started, 2)}


def _check_onnx(wrapper: torch.nn.Module, architecture: TransformerConfig, proto: bytes, where: Path) -> float:
    try:
        import onnxruntime  # an optional dependency (emformer[onnx]), needed only with --onnx
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
