"""`Clusterer`: an exported emformer model used like a scikit-learn clusterer.

    from emformer import Clusterer
    clusterer = Clusterer.from_pretrained("exports/debug", n_clusters=2, random_state=0)
    labels = clusterer.fit_predict(X)            # X: numpy array (n, d)

The model clusters *in context*: one forward pass reads all n points plus k initial centroids and returns
each point's soft assignment. So `fit(X)` is one episode: pick initial centroids (k-means++, spectral, or
given), run the transformer, keep the soft assignment. Loading needs only torch, numpy and safetensors
(no lightning, no deepspeed): the export directory is `model.safetensors` + `config.json` (DESIGN §4).

Input conventions, each a choice the model's training forces on us (figures: the debug model of
`configs/debug.yaml`, 200 steps, on 256 fresh episodes of its task k=2, d=4, n=32, Δ=3; oracle 0.064):
- **init**: the model refines initial centroids; it was trained (task.init = noisy_truth) with centroids
  near the true means. Raw k-means++ seeds are far from that: error 0.174. So k-means++ / spectral
  centroids are first refined by `init_iters` Lloyd iterations (default 10; 0 when the model was trained on
  that very init): error 0.076, Lloyd alone 0.090. Given centroids are used as they are.
- **standardize=True** ("isotropic", default): centre each episode and divide all features by one common
  scale, so that their mean variance is `config.json`'s `input_scale` (the training episodes' per-feature
  spread, measured at export). The model was trained on mixtures with noise σ = 1, so it is not
  scale-invariant; one common scale keeps the clusters' shape. "features" z-scores each feature instead
  (sklearn's StandardScaler), for features in unrelated units: it stretches the axes the clusters are
  separated along less than the others, so it costs accuracy on isotropic clusters (0.11–0.14 against
  0.08). False feeds X as it is, for data already on the training scale (e.g. `emformer.data` episodes:
  these are centred on the midpoint of the true means, which the model uses: 0.076 raw against 0.084
  standardized).
- **d below the model's d_in**: zero-padding, not a projection. The points (and any given centroids) get
  d_in - d zero coordinates, which keeps every distance and inner product, and is what training does for a
  task with `d_max`; d = 2 or 3 on the d = 4 debug model: 0.070 / 0.071 with the training init, as for d = 4.
  d above d_in is refused: reduce the dimension first (e.g. PCA), a choice about the data we do not make.
- **k**: any 2 <= k <= k_max (the model's centroid slots); unused slots are masked. `config.json` states
  the k range it was trained on: outside it the model runs but was never trained there.
- **n**: any n >= k (no positional encoding; attention costs O(n²) memory per episode).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from emformer.atomic import sha256_file
from emformer.data import inits
from emformer.errors import CheckpointError, ConfigError, DataError
from emformer.models.export_format import CONFIG_FILE, WEIGHTS_FILE, read_export_config
from emformer.models.transformer import ClusterTransformer, TransformerConfig

INIT_MODES = inits.POINT_INITS
STANDARDIZE_MODES = (True, False, "isotropic", "features")
DEFAULT_INIT_ITERS = 10

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[Sequence[float]]]


class InputError(DataError, ValueError):
    """X (or a given init) is not a finite (n, d) array the model can take. Both a DataError (the CLI prints
    it as one line) and a ValueError (what scikit-learn users catch)."""


class UnsupportedProblemError(ConfigError, ValueError):
    """k or d is beyond what the exported model supports."""


class ParameterError(ConfigError, ValueError):
    """A Clusterer parameter (init, n_clusters, n_passes, batch_size) has a value it cannot take."""


# ---------------------------------------------------------------------------------------- loading exports
def load_exported_model(model_dir: str | Path, device: str | torch.device = "cpu",
                        config: Optional[dict[str, Any]] = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the ClusterTransformer of an export and load its weights, checking every file against config.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
    standardize: True / "isotropic" (default): centre, then one common scale for all features so their mean
        variance is the training episodes'; "features": z-score each feature first (for features in unrelated
        units; it distorts the clusters' shape); False: feed X as it is (see module doc).
    init_iters: Lloyd iterations refining the k-means++ / spectral centroids before the model sees them.
        None: 0 when the model was trained with that init (its training distribution), else 10 (a model
        trained on noisy true means needs centroids near the truth; see module doc).
    random_state: seed (int), None, or a numpy Generator, for the k-means++ / spectral draws.
    n_passes: model passes; each further pass starts from the previous pass's soft centroids (like another
        EM round). 1 is what the model was trained and evaluated for.
    device: where the model runs ("cpu", "cuda", ...).
    batch_size: episodes per forward pass in the batched API.

    Fitted attributes: labels_ (n,), cluster_centers_ (k, d) = centroids of the soft assignment in X's
    coordinates, probabilities_ (n, k), init_centers_ (k, d), mean_ / scale_ (the standardization),
    n_features_in_.
    """

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], n_clusters: Optional[int] = None,
                 init: Union[str, ArrayLike] = "kmeans++", standardize: Union[bool, str] = True,
                 random_state: Union[int, np.random.Generator, None] = None, n_passes: int = 1,
                 init_iters: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                 batch_size: int = 256) -> None:
        self.model = model
        self.config = config
        self.n_clusters = n_clusters
        self.init = init
        self.standardize = standardize
        self.random_state = random_state
        self.n_passes = n_passes
        self.init_iters = init_iters
        self.device = torch.device(device)
        self.batch_size = batch_size
        arch = config["architecture"]
        self.d_max = int(arch["d_in"])
        self.k_max = int(arch["k_max"])
        self.input_scale = float(config.get("input_scale", 1.0))
        self._check_params()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: Union[str, torch.device] = "cpu",
                        **params: Any) -> "Clusterer":
        """Load an export directory written by `emformer export` (model.safetensors + config.json).
        `params` are the constructor's (n_clusters, init, standardize, random_state, n_passes, batch_size)."""
        model, config = load_exported_model(model_dir, device=device)
        clusterer = cls(model, config, device=device, **params)
        clusterer.model_dir_ = Path(model_dir)
        return clusterer

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {key: getattr(self, key) for key in ("n_clusters", "init", "standardize", "random_state", "n_passes",
                                                     "init_iters", "batch_size")}

    def set_params(self, **params: Any) -> "Clusterer":
        for key, value in params.items():
            if key not in self.get_params():
                raise ParameterError(f"unknown parameter {key!r}; parameters are {sorted(self.get_params())}")
            setattr(self, key, value)
        self._check_params()
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.get_params().items()
                         if not isinstance(value, (np.ndarray, torch.Tensor, list, tuple)))
        return f"Clusterer({args}, d_max={self.d_max}, k_max={self.k_max})"

    def _check_params(self) -> None:
        """Parameter errors at construction / set_params, where the bad value enters."""
        if isinstance(self.init, str) and self.init not in INIT_MODES:
            raise ParameterError(f"init: expected one of {', '.join(INIT_MODES)} or an array (k, d) of centroids, "
                                 f"got {self.init!r}")
        if self.standardize not in STANDARDIZE_MODES:
            raise ParameterError(f"standardize: expected True, False, 'isotropic' or 'features', got {self.standardize!r}")
        for name in ("n_passes", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ParameterError(f"{name}: expected a positive integer, got {value!r}")
        if self.init_iters is not None and (isinstance(self.init_iters, bool)
                                            or not isinstance(self.init_iters, (int, np.integer)) or self.init_iters < 0):
            raise ParameterError(f"init_iters: expected None or an integer >= 0, got {self.init_iters!r}")
        if self.n_clusters is not None and (isinstance(self.n_clusters, bool)
                                            or not isinstance(self.n_clusters, (int, np.integer))):
            raise ParameterError(f"n_clusters: expected an integer or None, got {self.n_clusters!r}")

    # ------------------------------------------------------------------ supported shapes
    def _resolve_k(self, init: Any = None) -> int:
        if init is not None and not isinstance(init, str):
            k = int(np.shape(init)[0]) if np.ndim(init) == 2 else -1
            if k < 0:
                raise InputError(f"init: expected an array (k, d) of centroids, got shape {np.shape(init)}")
            if self.n_clusters is not None and k != self.n_clusters:
                raise ParameterError(f"init: {k} centroids given but n_clusters={self.n_clusters}")
        elif self.n_clusters is not None:
            k = int(self.n_clusters)
        else:
            task = self.config["task"]
            if task.get("k_max") not in (None, task["k"]):
                raise ParameterError(f"n_clusters: required, this model was trained on k in "
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

    def _prepare(self, X: ArrayLike) -> tuple[np.ndarray, int, Optional[np.ndarray]]:
        """X checked against the model: (points (n, d) float64, k, given init (k, d) or None)."""
        points = as_points(X)
        k = self._resolve_k(self.init)
        self._check_d(points.shape[1])
        if points.shape[0] < k:
            raise InputError(f"X: {points.shape[0]} point(s) but n_clusters={k}: need at least as many points as "
                             f"clusters")
        init = None if isinstance(self.init, str) else self._given_init(self.init, k, points.shape[1])
        return points, k, init

    # ------------------------------------------------------------------ scikit-learn API
    def fit(self, X: ArrayLike, y: Any = None) -> "Clusterer":
        """Cluster X (n, d) in one episode; sets labels_, cluster_centers_, probabilities_."""
        points, k, init = self._prepare(X)
        mean, scale = self._standardization(points)
        proba, init_used = self._episode(points, k, init, mean, scale)
        self.mean_, self.scale_ = mean, scale
        self.probabilities_ = proba
        self.labels_ = proba.argmax(1)
        self.init_centers_ = init_used
        self.cluster_centers_ = _soft_centroids(points, proba, init_used)
        self.n_features_in_ = points.shape[1]
        return self

    def fit_predict(self, X: ArrayLike, y: Any = None) -> np.ndarray:
        """Labels (n,) of X's points, each in [0, k)."""
        return self.fit(X).labels_

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Soft assignments (n, k) of X's points, clustered in context.

        Before `fit`: X is clustered as one episode (init from `init`), exactly as fit(X) would.
        After `fit`: the model starts from the fitted cluster_centers_ (and the fitted standardization), so
        cluster j means the same cluster as in labels_.
        """
        if not hasattr(self, "cluster_centers_"):
            points, k, init = self._prepare(X)
            return self._episode(points, k, init, *self._standardization(points))[0]
        points = as_points(X)
        if points.shape[1] != self.n_features_in_:
            raise InputError(f"X: has {points.shape[1]} features but the clusterer was fitted on {self.n_features_in_}")
        k = self.cluster_centers_.shape[0]
        if points.shape[0] < k:
            raise InputError(f"X: {points.shape[0]} point(s) but the clusterer has {k} clusters")
        return self._episode(points, k, self.cluster_centers_, self.mean_, self.scale_)[0]

    def predict(self, X: ArrayLike) -> np.ndarray:
        return self.predict_proba(X).argmax(1)

    # ------------------------------------------------------------------ batched API
    def predict_proba_batch(self, points: ArrayLike, mask: Optional[ArrayLike] = None,
                            init: Optional[ArrayLike] = None, kmask: Optional[ArrayLike] = None) -> torch.Tensor:
        """Soft assignments of many episodes at once: points [B, n, d] -> probabilities [B, n, k], a float32
        tensor on the clusterer's device (rows of padded points are 0, columns of padded clusters too).

        mask [B, n] (True = real point) lets episodes have different n. init [B, k, d] gives each episode's
        initial centroids in the points' coordinates; without it they come from `init` ("kmeans++" /
        "spectral", drawn with random_state). kmask [B, k] (True = real cluster) lets episodes have different
        k; k is init's second dimension, else n_clusters. Standardization, when on, is per episode over its
        real points. Episodes go through the model `batch_size` at a time. numpy or torch inputs; pass
        tensors already on the device to avoid copies.
        """
        x = torch.as_tensor(points, dtype=torch.float32, device=self.device)
        if x.ndim != 3 or 0 in x.shape:
            raise InputError(f"points: expected a non-empty array [B, n, d], got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise InputError("points: contains NaN or inf; drop or impute them first")
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
            if not isinstance(self.init, str):
                raise ParameterError("init: an array of centroids is for one episode (fit); pass init=[B, k, d] "
                                     "to predict_proba_batch instead")
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
            out[part] = self._forward_batch(x[part], m[part], None if c is None else c[part], km[part], rng)[0]
        return out

    def predict_batch(self, points: ArrayLike, mask: Optional[ArrayLike] = None, init: Optional[ArrayLike] = None,
                      kmask: Optional[ArrayLike] = None) -> torch.Tensor:
        """Labels [B, n] (int64, -1 on padded points) of many episodes; arguments as predict_proba_batch."""
        proba = self.predict_proba_batch(points, mask, init, kmask)
        labels = proba.argmax(-1)
        if mask is not None:
            labels = labels.masked_fill(~self._batch_mask(mask, tuple(labels.shape), "mask"), -1)
        return labels

    def _batch_mask(self, mask: Optional[ArrayLike], shape: tuple[int, ...], name: str) -> torch.Tensor:
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
        """(mean, scale) per feature, z = (x - mean) / scale being the model's input; as _standardize_batch."""
        if not self.standardize:
            return np.zeros(points.shape[1]), np.ones(points.shape[1])
        x = torch.as_tensor(points)[None]
        mean, scale = _standardize_batch(x, torch.ones(x.shape[:2], dtype=torch.bool), self.standardize,
                                         self.input_scale)
        return mean[0, 0].numpy(), scale[0, 0].numpy()

    def _episode(self, points: np.ndarray, k: int, init: Optional[np.ndarray], mean: np.ndarray,
                 scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model over one episode in standardized coordinates; (proba (n, k), init in X's coordinates)."""
        z = torch.as_tensor((points - mean) / scale, dtype=torch.float32, device=self.device)[None]
        m = torch.ones(1, z.shape[1], dtype=torch.bool, device=self.device)
        c = None if init is None else torch.as_tensor((init - mean) / scale, dtype=torch.float32, device=self.device)[None]
        rng = np.random.default_rng(self.random_state)
        kmask = torch.ones(1, k, dtype=torch.bool, device=self.device)
        proba, init_used = self._forward_batch(z, m, c, kmask, rng, standardized=True)
        init_x = init_used[0, :k, : points.shape[1]].double().cpu().numpy() * scale + mean
        return proba[0].double().cpu().numpy(), init_x

    def _forward_batch(self, x: torch.Tensor, mask: torch.Tensor, init: Optional[torch.Tensor], kmask: torch.Tensor,
                       rng: np.random.Generator, standardized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """[b, n, d] points -> (probabilities [b, n, k], the model's init [b, k_max, d_max]): standardize, pad
        d and k, pick the init, run the model."""
        b, n, d = x.shape
        k = kmask.shape[1]
        x = x * mask[..., None]
        if self.standardize and not standardized:
            mean, scale = _standardize_batch(x, mask, self.standardize, self.input_scale)
            x = (x - mean) / scale * mask[..., None]
            if init is not None:
                init = (init - mean) / scale
        pad_d = self.d_max - d
        if pad_d:
            # Zero-padding keeps every distance and inner product, which is all the model compares.
            x = torch.nn.functional.pad(x, (0, pad_d))
            init = None if init is None else torch.nn.functional.pad(init, (0, pad_d))
        kmask = torch.nn.functional.pad(kmask, (0, self.k_max - k))  # unused slots are padded clusters
        if init is None:
            init = self._initial_centroids(x, mask, kmask, rng)
        else:
            init = torch.nn.functional.pad(init, (0, 0, 0, self.k_max - k)) * kmask[..., None]
        centroids = init
        with torch.inference_mode():
            for _ in range(self.n_passes):
                logits = self.model(x, mask, centroids, kmask)
                proba = torch.softmax(logits.float(), dim=-1).nan_to_num(0.0) * mask[..., None]
                # The next pass starts from this one's soft centroids (an empty cluster keeps its centroid).
                mass = proba.sum(1)
                soft = proba.transpose(1, 2) @ x / mass.clamp(min=1e-12)[..., None]
                centroids = torch.where((mass > 1e-6)[..., None], soft, centroids) * kmask[..., None]
        return proba[..., :k], init

    def _initial_centroids(self, x: torch.Tensor, mask: torch.Tensor, kmask: torch.Tensor,
                           rng: np.random.Generator) -> torch.Tensor:
        uniforms = torch.as_tensor(rng.random((x.shape[0], self.k_max)), dtype=torch.float32, device=x.device)
        centroids = inits.initial_centroids(self.init, inits.InitInputs(x, mask, kmask, uniforms)).to(x.dtype)
        iters = self.init_iters
        if iters is None:  # the model's own training init as it was; refined k-means otherwise
            iters = 0 if self.config["task"].get("init") == self.init else DEFAULT_INIT_ITERS
        if iters:
            centroids = inits.lloyd(x, mask, kmask, centroids, iters)[0].to(x.dtype)
        return centroids * kmask[..., None]


def _standardize_batch(x: torch.Tensor, mask: torch.Tensor, mode: Union[bool, str],
                       input_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-episode (mean [B,1,d], scale [B,1,d]) over the real points of x [B,n,d].

    isotropic (True): one scale for all features, so the mean per-feature variance becomes input_scale²
    (the training episodes'); the clusters keep their shape. features: each feature to variance
    input_scale². A feature (or episode) without spread gets scale 1 instead of a division by 0.
    """
    dtype = x.dtype
    x = x.double()
    m = mask[..., None].double()
    count = m.sum(1, keepdim=True).clamp(min=1)
    mean = (x * m).sum(1, keepdim=True) / count
    var = (((x - mean) * m) ** 2).sum(1, keepdim=True) / count
    if mode != "features":
        var = var.mean(-1, keepdim=True).expand_as(var)
    tiny = 1e-24 * (1 + (mean ** 2).amax(-1, keepdim=True))
    std = torch.where(var > tiny, var.sqrt(), torch.ones_like(var))
    return mean.to(dtype), (std / input_scale).to(dtype)


def _soft_centroids(points: np.ndarray, proba: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Centroids of a soft assignment; a cluster with (almost) no mass keeps its fallback centroid."""
    mass = proba.sum(0)
    centroids = proba.T @ points / np.maximum(mass, 1e-12)[:, None]
    empty = mass < 1e-6
    centroids[empty] = fallback[empty]
    return centroids
