"""What the Clusterer accepts as X: finite (n, d) arrays, read-only ones included, each bad value one error."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from emformer.models.inputs import InputError, as_points, float64_tensor


class ReadOnlyFrame:
    """What a pandas DataFrame is to numpy under copy-on-write: `__array__` hands out a read-only view."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def __array__(self, dtype=None, copy=None):
        view = self.values.view()
        view.setflags(write=False)
        return view if dtype is None else view.astype(dtype, copy=False)


def test_read_only_inputs_reach_torch_without_its_warning() -> None:
    values = np.random.default_rng(0).normal(size=(12, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch: "The given NumPy array is not writable ..."
        points = as_points(ReadOnlyFrame(values))
        torch.as_tensor(points)
        batch = float64_tensor(ReadOnlyFrame(values[None]), torch.device("cpu"))
    assert points.flags.writeable and np.array_equal(points, values)
    assert batch.dtype == torch.float64 and torch.equal(batch[0], torch.as_tensor(values))


@pytest.mark.parametrize("X, message", [
    (np.zeros((4,)), "expected a 2-d array"),
    (np.zeros((0, 3)), "empty array"),
    (np.array([[0.0, np.nan]]), "non-finite value"),
    ([["a", "b"]], "could not convert"),
])
def test_bad_inputs_are_named(X, message: str) -> None:
    with pytest.raises(InputError, match=message):
        as_points(X)
