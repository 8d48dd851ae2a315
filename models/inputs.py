"""What the Clusterer accepts: X and given centroids as finite float64 arrays, the model's float32 input, and
the errors a bad value raises (each one line naming the argument; a ValueError too, as scikit-learn users
expect).

Read-only arrays (a pandas DataFrame's values under copy-on-write, a memory-mapped .npy) are copied once
here: torch cannot wrap a read-only buffer without warning that writing to it would be undefined.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

from emformer.errors import ConfigError, DataError

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[Sequence[float]]]


class InputError(DataError, ValueError):
    """X (or a given init) is not a finite (n, d) array the model can take. Both a DataError (the CLI prints
    it as one line) and a ValueError (what scikit-learn users catch)."""


class UnsupportedProblemError(ConfigError, ValueError):
    """k or d is beyond what the exported model supports."""


class ParameterError(ConfigError, ValueError):
    """A Clusterer parameter (init, n_clusters, n_passes, batch_size) has a value it cannot take."""


class OutOfRangeWarning(UserWarning):
    """k, d or n lies outside the range the model was trained on: it runs, but was never trained there."""


def _writable(array: np.ndarray) -> np.ndarray:
    return array if array.flags.writeable else array.copy()


def as_points(X: ArrayLike, name: str = "X") -> np.ndarray:
    """X as a float64 (n, d) array, or an InputError saying what is wrong with it."""
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    try:
        array = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: expected a numeric array of shape (n, d), could not convert it ({exc})") from None
    array = _writable(array)
    if array.ndim != 2:
        raise InputError(f"{name}: expected a 2-d array of shape (n_points, n_features), got {array.ndim}-d shape "
                         f"{array.shape}" + ("; use predict_proba_batch for [B, n, d] batches" if array.ndim == 3 else ""))
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{name}: empty array of shape {array.shape}")
    _check_finite(array, name)
    return array


def _check_finite(array: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        where = np.argwhere(bad)[0]
        kind = "NaN" if np.isnan(array[tuple(where)]) else "inf"
        raise InputError(f"{name}: {int(bad.sum())} non-finite value(s) ({kind} first at index {tuple(int(i) for i in where)}); "
                         f"drop or impute them first")


def float64_tensor(values: ArrayLike, device: torch.device) -> torch.Tensor:
    """A tensor in float64 (a list would otherwise become float32 before anything is centred)."""
    if isinstance(values, torch.Tensor):
        return values.to(device=device, dtype=torch.float64)
    return torch.as_tensor(_writable(np.asarray(values, dtype=np.float64)), device=device)


def model_input(x: torch.Tensor, name: str) -> torch.Tensor:
    """float32 model input; values beyond float32's range (standardize=False on huge data) are an InputError."""
    out = x.float()
    if not torch.isfinite(out).all():
        raise InputError(f"{name}: values up to {float(x.abs().max()):.3g} overflow the model's float32 input; "
                         f"rescale the data or use standardize=True")
    return out
