"""The RNG states a checkpoint carries, restored on a machine that shows fewer GPUs than the saving one did."""
from __future__ import annotations

import torch

from emformer.train import callbacks


def test_rng_state_restores_onto_fewer_visible_gpus(monkeypatch):
    """Saved with 2 GPUs' states, restored where 1 is visible (a requeue onto a smaller node): the visible one
    gets its state, and nothing raises (set_rng_state_all would, for the device that is not there)."""
    restored = {}

    def set_rng_state(state, device="cuda"):
        index = torch.device(device).index if not isinstance(device, int) else device
        if (index or 0) >= torch.cuda.device_count():
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        restored[index or 0] = state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)  # what set_rng_state_all calls
    state = callbacks.rng_state()
    saved = [torch.full((8,), 1, dtype=torch.uint8), torch.full((8,), 2, dtype=torch.uint8)]
    state["cuda"] = saved
    before = torch.rand(3)
    callbacks.set_rng_state(state)
    assert list(restored) == [0] and torch.equal(restored[0], saved[0])
    torch.testing.assert_close(torch.rand(3), before)  # the CPU generators are restored too
