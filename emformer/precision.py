"""Float32 regions inside mixed precision: the few ops whose bf16 rounding would change a result."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch


def float32_region(device_type: str) -> ContextManager[object]:
    """Autocast off for the enclosed ops when it is on (their float32 inputs then stay float32); nothing
    otherwise, so an export or a compile without autocast sees no autocast context at all."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
