"""`Clusterer`: an exported emformer model used like a scikit-learn clusterer.

    from emformer import Clusterer
    clusterer = Clusterer.from_pretrained("exports/debug", n_clusters=2, random_state=0)
    labels = clusterer.fit_predict(X)            # X: numpy array (n, d)

The model clusters *in context*: one forward pass reads all n points plus k initial centroids and returns
each point's soft assignment. So `fit(X)` is one episode: pick initial centroids (k-means++, spectral, or
given), run the transformer, keep the soft assignment. Loading needs only torch, numpy and safetensors
(no lightning, no deepspeed): the export directory is `model.safetensors` + `config.json` (DESIGN §4).

Input conventions, each a choice the model's training forces on us:
- **standardize=True** (default): each feature is z-scored, then multiplied by `config.json`'s
  `input_scale` (the typical per-feature spread of the training episodes, measured at export). The model
  was pre-trained on mixtures with noise σ = 1 at a known separation, so it is not scale-invariant; this
  puts user data on the scale it saw in training. Set `standardize=False` for data that already looks like
  the training episodes (e.g. the eval sets of `emformer.data.episodes`).
- **d below the model's d_in**: the points (and any given centroids) are zero-padded to d_in coordinates.
  Distances are unchanged, which is what the attention layers compare; the model saw zero padding in
  training when the task had `d_max`. d above d_in is refused.
- **k**: any 2 <= k <= k_max (the model's centroid slots); unused slots are masked. `config.json` states
  the k range it was trained on: outside it the model runs but was never trained there.
- **n**: any n >= k (attention costs O(n²) memory per episode).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from emformer.errors import CheckpointError, ConfigError, DataError

EXPORT_FORMAT = "emformer-export"
EXPORT_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
INIT_MODES = ("kmeans++", "spectral")

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[Sequence[float]]]


class InputError(DataError, ValueError):
    """X (or a given init) is not a finite (n, d) array the model can take. Both a DataError (the CLI prints
    it as one line) and a ValueError (what scikit-learn users catch)."""


class UnsupportedProblemError(ConfigError, ValueError):
    """k or d is beyond what the exported model supports."""


# ---------------------------------------------------------------------------------------- loading exports
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_export_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of an export directory, checked for format and version."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such export directory (make one with `emformer export RUN_DIR --out DIR`)")
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {model_dir} is not an emformer export (`emformer export` writes it)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path}: expected 'format': '{EXPORT_FORMAT}', got {config.get('format') if isinstance(config, dict) else config!r}")
    version = config.get("format_version")
    if not isinstance(version, int) or version > EXPORT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported by this emformer "
                              f"(reads up to {EXPORT_FORMAT_VERSION}); upgrade emformer")
    for key in ("architecture", "task", "supported"):
        if not isinstance(config.get(key), dict):
            raise CheckpointError(f"{path}: missing the '{key}' section")
    return config


def load_exported_model(model_dir: str | Path, device: str | torch.device = "cpu",
                        config: Optional[dict[str, Any]] = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the ClusterTransformer of an export and load its weights, checking every file against config.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from emformer.models.transformer import ClusterTransformer, TransformerConfig

    model_dir = Path(model_dir)
    config = config if config is not None else read_export_config(model_dir)
    weights_path = model_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing (an export holds {WEIGHTS_FILE} next to {CONFIG_FILE})")
    expected = config.get("files", {}).get(WEIGHTS_FILE, {}).get("sha256")
    if expected is not None and sha256_file(weights_path) != expected:
        raise CheckpointError(f"{weights_path}: does not match {model_dir / CONFIG_FILE} (sha256 differs from the "
                              f"one recorded at export): the files come from different exports; re-export")
    try:
        architecture = TransformerConfig.from_dict(dict(config["architecture"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{model_dir / CONFIG_FILE}: bad 'architecture' section ({exc})") from None
    model = ClusterTransformer(architecture)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    check_state_dict(model, state, where=f"{weights_path} vs {model_dir / CONFIG_FILE}")
    model.load_state_dict(state, strict=True)
    model.eval().to(device)
    return model, config


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise CheckpointError naming missing, unexpected or mis-shaped tensors (before load_state_dict does,
    less clearly)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{key}: file {tuple(state[key].shape)}, architecture {tuple(own[key].shape)}"
              for key in sorted(set(own) & set(state)) if tuple(own[key].shape) != tuple(state[key].shape)]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if shapes:
        problems.append(f"shape mismatch in {len(shapes)} tensor(s): " + "; ".join(shapes[:3]) + (" ..." if len(shapes) > 3 else ""))
    if problems:
        raise CheckpointError(f"{where}: the weights do not fit the architecture: {', '.join(problems)}")


# ------------------------------------------------------------------------------------------ input checks
def as_points(X: ArrayLike, name: str = "X") -> np.ndarray:
    """X as a float64 (n, d) array, or an InputError saying what is wrong with it."""
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    try:
        array = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: expected a numeric array of shape (n, d), could not convert it ({exc})") from None
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


# -------------------------------------------------------------------------------------------- the clusterer
class Clusterer:
    """A pre-trained in-context clusterer with a scikit-learn-style API.

    Parameters
    ----------
    model, config: the ClusterTransformer and its export config (use `Clusterer.from_pretrained(DIR)`).
    n_clusters: k; defaults to the k the model was trained on (required when it was trained on a range).
    init: "kmeans++" | "spectral" | an array (k, d) of initial centroids in X's coordinates.
    standardize: z-score each feature, then scale to the training episodes' spread (see module doc).
    random_state: seed (int), None, or a numpy Generator, for the k-means++ / spectral draws.
    n_passes: model passes; each further pass starts from the previous pass's soft centroids (like another
        EM round). 1 is what the model was trained and evaluated for.
    device: where the model runs ("cpu", "cuda", ...).

    Fitted attributes: labels_ (n,), cluster_centers_ (k, d) = centroids of the soft assignment in X's
    coordinates, probabilities_ (n, k), init_centers_ (k, d), mean_ / scale_ (the standardization),
    n_features_in_.
    """

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], n_clusters: Optional[int] = None,
                 init: Union[str, ArrayLike] = "kmeans++", standardize: bool = True,
                 random_state: Union[int, np.random.Generator, None] = None, n_passes: int = 1,
                 device: Union[str, torch.device] = "cpu", batch_size: int = 64) -> None:
        self.model = model
        self.config = config
        self.n_clusters = n_clusters
        self.init = init
        self.standardize = standardize
        self.random_state = random_state
        self.n_passes = n_passes
        self.device = torch.device(device)
        self.batch_size = batch_size
        arch = config["architecture"]
        self.d_max = int(arch["d_in"])
        self.k_max = int(arch["k_max"])
        self.input_scale = float(config.get("input_scale", 1.0))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: Union[str, torch.device] = "cpu",
                        **params: Any) -> "Clusterer":
        """Load an export directory written by `emformer export` (model.safetensors + config.json)."""
        model, config = load_exported_model(model_dir, device=device)
        clusterer = cls(model, config, device=device, **params)
        clusterer.model_dir_ = Path(model_dir)
        return clusterer

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {key: getattr(self, key) for key in ("n_clusters", "init", "standardize", "random_state", "n_passes")}

    def set_params(self, **params: Any) -> "Clusterer":
        for key, value in params.items():
            if key not in self.get_params():
                raise ValueError(f"unknown parameter {key!r}; parameters are {sorted(self.get_params())}")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.get_params().items() if not isinstance(value, np.ndarray))
        return f"Clusterer({args}, d_max={self.d_max}, k_max={self.k_max})"

    # ------------------------------------------------------------------ supported shapes
    def _resolve_k(self, init: Any = None) -> int:
        if init is not None and not isinstance(init, str):
            k = int(np.shape(init)[-2]) if np.ndim(init) >= 2 else -1
            if self.n_clusters is not None and k != self.n_clusters:
                raise UnsupportedProblemError(f"init: {k} centroids given but n_clusters={self.n_clusters}")
        elif self.n_clusters is not None:
            k = int(self.n_clusters)
        else:
            task = self.config["task"]
            if task.get("k_max") not in (None, task["k"]):
                raise UnsupportedProblemError(f"n_clusters: required, this model was trained on k in "
                                              f"[{task['k']}, {task['k_max']}]")
            k = int(task["k"])
        if not 2 <= k <= self.k_max:
            raise UnsupportedProblemError(f"n_clusters: this model supports 2 <= k <= {self.k_max} "
                                          f"(its centroid slots), got k={k}")
        return k

    def _check_d(self, d: int, name: str = "X") -> None:
        if d > self.d_max:
            raise UnsupportedProblemError(f"{name}: has {d} features but this model takes at most d={self.d_max} "
                                          f"(smaller d is zero-padded; reduce the dimension first, e.g. with PCA)")

    # ------------------------------------------------------------------ scikit-learn API
    def fit(self, X: ArrayLike, y: Any = None) -> "Clusterer":
        """Cluster X (n, d) in one episode; sets labels_, cluster_centers_, probabilities_."""
        points = as_points(X)
        k = self._resolve_k(self.init)
        self._check_d(points.shape[1])
        if points.shape[0] < k:
            raise InputError(f"X: {points.shape[0]} point(s) but n_clusters={k}: need at least as many points as clusters")
        init = None if isinstance(self.init, str) else self._given_init(self.init, k, points.shape[1])
        self.mean_, self.scale_ = self._standardization(points)
        proba, init_used = self._cluster_one(points, k, init)
        for _ in range(self.n_passes - 1):
            proba, _ = self._cluster_one(points, k, _soft_centroids(points, proba, init_used))
        self.probabilities_ = proba
        self.labels_ = proba.argmax(1)
        self.init_centers_ = init_used
        self.cluster_centers_ = _soft_centroids(points, proba, init_used)
        self.n_features_in_ = points.shape[1]
        return self

    def fit_predict(self, X: ArrayLike, y: Any = None) -> np.ndarray:
        return self.fit(X).labels_

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Soft assignments (n, k) of X's points, clustered in context.

        Before `fit`: X is clustered as one episode (init from `init`), exactly as fit(X) would.
        After `fit`: the model starts from the fitted cluster_centers_ (and the fitted standardization), so
        cluster j means the same cluster as in labels_.
        """
        points = as_points(X)
        if not hasattr(self, "cluster_centers_"):
            k = self._resolve_k(self.init)
            self._check_d(points.shape[1])
            if points.shape[0] < k:
                raise InputError(f"X: {points.shape[0]} point(s) but n_clusters={k}")
            init = None if isinstance(self.init, str) else self._given_init(self.init, k, points.shape[1])
            mean, scale = self._standardization(points)
            proba, init_used = self._cluster_one(points, k, init, mean, scale)
            for _ in range(self.n_passes - 1):
                proba, _ = self._cluster_one(points, k, _soft_centroids(points, proba, init_used), mean, scale)
            return proba
        if points.shape[1] != self.n_features_in_:
            raise InputError(f"X: has {points.shape[1]} features but the clusterer was fitted on {self.n_features_in_}")
        k = self.cluster_centers_.shape[0]
        if points.shape[0] < k:
            raise InputError(f"X: {points.shape[0]} point(s) but the clusterer has {k} clusters")
        proba, _ = self._cluster_one(points, k, self.cluster_centers_)
        return proba

    def predict(self, X: ArrayLike) -> np.ndarray:
        return self.predict_proba(X).argmax(1)

    # ------------------------------------------------------------------ batched API
    def predict_proba_batch(self, points: ArrayLike, mask: Optional[ArrayLike] = None,
                            init: Optional[ArrayLike] = None, kmask: Optional[ArrayLike] = None) -> torch.Tensor:
        """Soft assignments of many episodes at once: points [B, n, d] -> probabilities [B, n, k], a tensor on
        the clusterer's device (rows of padded points are 0, columns of padded clusters too).

        mask [B, n] (True = real point) lets episodes have different n. init [B, k, d] gives each episode's
        initial centroids in the points' coordinates; without it they come from `init` ("kmeans++" /
        "spectral", drawn with random_state). kmask [B, k] (True = real cluster) lets episodes have different
        k; k is init's second dimension, else n_clusters. Standardization, when on, is per episode over its
        real points. Episodes go through the model `batch_size` at a time.
        """
        x = torch.as_tensor(points, dtype=torch.float32, device=self.device)
        if x.ndim != 3:
            raise InputError(f"points: expected shape [B, n, d], got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise InputError("points: contains NaN or inf")
        batch, n, d = x.shape
        self._check_d(d, "points")
        m = self._batch_mask(mask, (batch, n), "mask")
        c = None
        if init is not None:
            c = torch.as_tensor(init, dtype=torch.float32, device=self.device)
            if c.ndim != 3 or c.shape[0] != batch or c.shape[2] != d:
                raise InputError(f"init: expected shape [{batch}, k, {d}], got {tuple(c.shape)}")
            if not torch.isfinite(c).all():
                raise InputError("init: contains NaN or inf")
            k = c.shape[1]
            if not 2 <= k <= self.k_max:
                raise UnsupportedProblemError(f"init: this model supports 2 <= k <= {self.k_max} centroids, got {k}")
        else:
            k = self._resolve_k(self.init)
        km = self._batch_mask(kmask, (batch, k), "kmask")
        if (km.sum(1) < 1).any():
            raise InputError("kmask: every episode needs at least one real cluster")
        too_few = m.sum(1) < km.sum(1)
        if too_few.any():
            raise InputError(f"points: episode {int(too_few.nonzero()[0, 0])} has fewer real points than clusters")
        out = torch.zeros(batch, n, k, device=self.device)
        rng = np.random.default_rng(self.random_state)
        for start in range(0, batch, self.batch_size):
            part = slice(start, min(start + self.batch_size, batch))
            out[part] = self._forward_batch(x[part], m[part], None if c is None else c[part], km[part], rng)
        return out

    def _batch_mask(self, mask: Optional[ArrayLike], shape: tuple[int, int], name: str) -> torch.Tensor:
        if mask is None:
            return torch.ones(shape, dtype=torch.bool, device=self.device)
        m = torch.as_tensor(mask, device=self.device).bool()
        if tuple(m.shape) != shape:
            raise InputError(f"{name}: expected shape {shape}, got {tuple(m.shape)}")
        return m

    # ------------------------------------------------------------------ internals
    def _given_init(self, init: ArrayLike, k: int, d: int) -> np.ndarray:
        centroids = as_points(init, name="init")
        if centroids.shape != (k, d):
            raise InputError(f"init: expected {k} centroids of dimension {d} (shape {(k, d)}), got {centroids.shape}")
        return centroids

    def _standardization(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.standardize:
            return np.zeros(points.shape[1]), np.ones(points.shape[1])
        mean = points.mean(0)
        std = points.std(0)
        # A constant feature carries no information; leave it at 0 rather than divide by 0.
        std = np.where(std > 1e-12 * max(1.0, float(np.abs(points).max())), std, 1.0)
        return mean, std / self.input_scale

    def _cluster_one(self, points: np.ndarray, k: int, init: Optional[np.ndarray],
                     mean: Optional[np.ndarray] = None, scale: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """One episode through the model in standardized coordinates; returns (proba (n, k), init in X's coordinates)."""
        mean = self.mean_ if mean is None else mean
        scale = self.scale_ if scale is None else scale
        z = torch.as_tensor((points - mean) / scale, dtype=torch.float32, device=self.device)[None]
        m = torch.ones(1, z.shape[1], dtype=torch.bool, device=self.device)
        c = None if init is None else torch.as_tensor((init - mean) / scale, dtype=torch.float32, device=self.device)[None]
        rng = np.random.default_rng(self.random_state)
        kmask = torch.ones(1, k, dtype=torch.bool, device=self.device)
        proba, init_used = self._forward_batch(z, m, c, kmask, rng, standardized=True, return_init=True)
        init_x = init_used[0, :k, : points.shape[1]].double().cpu().numpy() * scale + mean
        return proba[0].double().cpu().numpy(), init_x

    def _forward_batch(self, x: torch.Tensor, mask: torch.Tensor, init: Optional[torch.Tensor], kmask: torch.Tensor,
                       rng: np.random.Generator, standardized: bool = False, return_init: bool = False):
        """[b, n, d] points -> probabilities [b, n, k]: standardize, pad d and k, pick init, run the model."""
        b, n, d = x.shape
        k = kmask.shape[1]
        x = x * mask[..., None]
        if self.standardize and not standardized:
            count = mask.sum(1, keepdim=True).clamp(min=1)[..., None].float()
            mean = x.sum(1, keepdim=True) / count
            var = (((x - mean) * mask[..., None]) ** 2).sum(1, keepdim=True) / count
            std = torch.where(var.sqrt() > 1e-12, var.sqrt(), torch.ones_like(var)) / self.input_scale
            x = (x - mean) / std * mask[..., None]
            if init is not None:
                init = (init - mean) / std
        pad_d = self.d_max - d
        if pad_d:
            x = torch.nn.functional.pad(x, (0, pad_d))
            init = None if init is None else torch.nn.functional.pad(init, (0, pad_d))
        kmask = torch.nn.functional.pad(kmask, (0, self.k_max - k))  # unused slots are padded clusters
        if init is None:
            init = self._initial_centroids(x, mask, kmask, rng)
        else:
            init = torch.nn.functional.pad(init, (0, 0, 0, self.k_max - k)) * kmask[..., None]
        with torch.inference_mode():
            logits = self.model(x, mask, init, kmask)
        proba = torch.softmax(logits[..., :k].float(), dim=-1) * mask[..., None]
        return (proba, init) if return_init else proba

    def _initial_centroids(self, x: torch.Tensor, mask: torch.Tensor, kmask: torch.Tensor,
                           rng: np.random.Generator) -> torch.Tensor:
        mode = self.init if isinstance(self.init, str) else None
        if mode not in INIT_MODES:
            raise ConfigError(f"init: expected one of {', '.join(INIT_MODES)} or an array of centroids, got {self.init!r}")
        from emformer.models import baselines  # torch only; imported when an init must be drawn

        uniforms = torch.as_tensor(rng.random((x.shape[0], self.k_max)), dtype=torch.float32, device=x.device)
        draw = baselines.kmeans_plus_plus if mode == "kmeans++" else baselines.spectral_init
        return draw(x, mask, kmask, uniforms).to(x.dtype) * kmask[..., None]


def _soft_centroids(points: np.ndarray, proba: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Centroids of a soft assignment; a cluster with (almost) no mass keeps its fallback centroid."""
    mass = proba.sum(0)
    centroids = proba.T @ points / np.maximum(mass, 1e-12)[:, None]
    empty = mass < 1e-6
    centroids[empty] = fallback[empty]
    return centroids
