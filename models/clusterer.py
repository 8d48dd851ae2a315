"""`Clusterer`: an exported emformer model used like a scikit-learn clusterer.

    from emformer import Clusterer
    clusterer = Clusterer.from_pretrained("exports/debug", n_clusters=2, random_state=0)
    labels = clusterer.fit_predict(X)            # X: numpy array (n, d)

The model clusters *in context*: one forward pass reads all n points plus k initial centroids and returns
each point's soft assignment. So `fit(X)` is one episode: pick initial centroids (k-means++, spectral, or
given), run the transformer, keep the soft assignment. Loading needs only torch, numpy and safetensors
(no lightning, no deepspeed): the export directory is `model.safetensors` + `config.json` (DESIGN §4).

Input conventions, each a choice the model's training forces on us (docs/export.md; figures in BENCHMARKS.md
and each export's card):
- **init**: the model refines initial centroids; it was trained (task.init = noisy_truth) with centroids
  near the true means. Raw k-means++ seeds are far from that, so k-means++ / spectral centroids are first
  refined by `init_iters` Lloyd iterations (default 10; 0 when the model was trained on that very init).
  Given centroids are used as they are.
- **standardize=True** ("isotropic", default): centre each episode and divide all features by one common
  scale, so that their mean variance is `config.json`'s `input_scale` (the training episodes' per-feature
  spread, measured at export). The model was trained on mixtures with noise σ = 1, so it is not
  scale-invariant; one common scale keeps the clusters' shape. A model trained with task.standardize saw
  every episode standardized by this very rule (emformer.data.standardize) to a spread of 1, so X is
  standardized to 1 for it: the model, count head included, sees X as it saw its training episodes.
  "features" z-scores each feature instead (sklearn's StandardScaler), for features in unrelated units: it
  stretches the axes the clusters are separated along less than the others, so it costs accuracy on
  isotropic clusters. False feeds X as it is, for data already on the training
  scale (e.g. `emformer.data` episodes: these are centred on the midpoint of the true means, which the model
  uses).
- **d below the model's d_in**: zero-padding, not a projection. The points (and any given centroids) get
  d_in - d zero coordinates, which keeps every distance and inner product, and is what training does for a
  task with `d_max`.
  d above d_in is refused: reduce the dimension first (e.g. PCA), a choice about the data we do not make.
- **k**: any 2 <= k <= k_max (the model's centroid slots); unused slots are masked. `config.json` states
  the k range it was trained on: outside it the model runs but was never trained there.
- **n**: any n >= k (no positional encoding; attention costs O(n²) memory per episode).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from emformer.data import inits
from emformer.data.standardize import STANDARD_SCALE, standardization
from emformer.models import baselines, calibration
from emformer.models.export_format import CONFIG_FILE, clusterer_defaults, count_posterior
from emformer.models.export_loader import load_exported_model
from emformer.models.inputs import (ArrayLike, InputError, OutOfRangeWarning, ParameterError, UnsupportedProblemError,
                                    as_points, float64_tensor, model_input)
from emformer.models.registry import resolve_model_dir
from emformer.models.transformer import soft_assignment

INIT_MODES = inits.POINT_INITS
STANDARDIZE_MODES = (True, False, "isotropic", "features")
DEFAULT_INIT_ITERS = 10
AUTO = "auto"
BIC_STARTS = 5
"""k-means++ starts of the tied spherical EM whose BIC votes on P(k | X) (`Clusterer._k_evidence`)"""
BIC_EM_ITERS = 50
"""EM iterations from each of those starts"""



# -------------------------------------------------------------------------------------------- the clusterer
class Clusterer:
    """A pre-trained in-context clusterer with a scikit-learn-style API.

    Parameters
    ----------
    model, config: the ClusterTransformer and its export config (use `Clusterer.from_pretrained(DIR or NAME)`).
    n_clusters: k; "auto" lets the model's count head pick k (the most probable under P(k | X)); defaults to
        the k the model was trained on (required when it was trained on a range).
    init: "kmeans++" | "spectral" | an array (k, d) of initial centroids in X's coordinates.
    standardize: True / "isotropic" (default): centre, then one common scale for all features so their mean
        variance is the training episodes' at X's d; "features": z-score each feature first (for features in
        unrelated units; it distorts the clusters' shape); False: feed X as it is (see module doc).
    init_iters: Lloyd iterations refining the k-means++ / spectral centroids before the model sees them.
        None: 0 when the model was trained with that init (its training distribution), else 10 (a model
        trained on noisy true means needs centroids near the truth; see module doc).
    n_init: starts (k-means++ / spectral draws), run as one batch; the one whose assignment fits X best is
        kept, scored by the log-likelihood of the spherical Gaussian mixture fitted to it (like
        scikit-learn's n_init, which keeps the lowest inertia). Ignored for a given init array.
    em_steps: EM iterations (spherical covariances) after the model, started from its soft assignment;
        0 keeps the model's assignment as it is.
    random_state: seed (int), None, or a numpy Generator, for the k-means++ / spectral draws.
    n_passes: model passes; each further pass starts from the previous pass's centroids (the soft M-step of
        its assignment, or the model's centroid head; like another EM round). None: the passes the model was
        trained and evaluated for (config.json's architecture.passes; 1 for exports without it).
    device: where the model runs ("cpu", "cuda", ...).
    batch_size: episodes per forward pass in the batched API.

    Fitted attributes: labels_ (n,), cluster_centers_ (k, d) = centroids of the soft assignment in X's
    coordinates, probabilities_ (n, k), init_centers_ (k, d), mean_ / scale_ (the standardization),
    n_features_in_, n_clusters_ (the k used), log_likelihood_ (the kept start's score, per point, in
    standardized coordinates), k_proba_ (with n_clusters="auto": P(k | X) as {k: probability}).

    k, d or n outside the ranges the model was trained on (config.json's supported.*.trained) raise an
    OutOfRangeWarning naming the range: the model runs there, untested.
    """

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], n_clusters: Union[int, str, None] = None,
                 init: Union[str, ArrayLike] = "kmeans++", standardize: Union[bool, str] = True,
                 random_state: Union[int, np.random.Generator, None] = None, n_passes: Optional[int] = None,
                 init_iters: Optional[int] = None, n_init: int = 1, em_steps: int = 0,
                 device: Union[str, torch.device] = "cpu", batch_size: int = 256) -> None:
        self.model = model
        self.config = config
        self.n_clusters = n_clusters
        self.init = init
        self.standardize = standardize
        self.random_state = random_state
        self.n_passes = int(config["architecture"].get("passes", 1)) if n_passes is None else n_passes
        self.init_iters = init_iters
        self.n_init = n_init
        self.em_steps = em_steps
        self.device = torch.device(device)
        self.batch_size = batch_size
        arch = config["architecture"]
        self.d_max = int(arch["d_in"])
        self.k_max = int(arch["k_max"])
        self.k_min = int(arch.get("k_min", 2))
        self.has_count_head = bool(arch.get("count_head", False))
        # P(k | X)'s calibration, fitted at export on held-out episodes (models/calibration.py)
        self.k_posterior = count_posterior(config, CONFIG_FILE)
        self._check_params()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: Union[str, torch.device] = "cpu",
                        **params: Any) -> "Clusterer":
        """Load an export directory written by `emformer export` (model.safetensors + config.json), or a
        shipped model by name ("emformer-gmm-small"). `params` are the constructor's; those the export's
        config.json sets in clusterer_defaults (e.g. the shipped model's n_init and em_steps) default to its
        values, and what is passed here wins."""
        model_dir = resolve_model_dir(model_dir)
        model, config = load_exported_model(model_dir, device=device)
        params = {**clusterer_defaults(config, str(model_dir / CONFIG_FILE)), **params}
        clusterer = cls(model, config, device=device, **params)
        clusterer.model_dir_ = Path(model_dir)
        return clusterer

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {key: getattr(self, key) for key in ("n_clusters", "init", "standardize", "random_state", "n_passes",
                                                     "init_iters", "n_init", "em_steps", "batch_size")}

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
        for name, least in (("n_passes", 1), ("batch_size", 1), ("n_init", 1), ("em_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ParameterError(f"{name}: expected {'a positive integer' if least else 'an integer >= 0'}, got {value!r}")
        if self.init_iters is not None and (isinstance(self.init_iters, bool)
                                            or not isinstance(self.init_iters, (int, np.integer)) or self.init_iters < 0):
            raise ParameterError(f"init_iters: expected None or an integer >= 0, got {self.init_iters!r}")
        if self.n_clusters == AUTO:
            if not self.has_count_head:
                raise ParameterError("n_clusters: 'auto' needs a model trained with a count head "
                                     "(model.count_head=true), this one has none; give k")
            if not isinstance(self.init, str):
                raise ParameterError("n_clusters: 'auto' draws its own k initial centroids; init must be "
                                     "'kmeans++' or 'spectral', not an array")
        elif self.n_clusters is not None and (isinstance(self.n_clusters, bool)
                                              or not isinstance(self.n_clusters, (int, np.integer))):
            raise ParameterError(f"n_clusters: expected an integer, 'auto' or None, got {self.n_clusters!r}")

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
                                     f"[{task['k']}, {task['k_max']}]" + (" (or 'auto')" if self.has_count_head else ""))
            k = int(task["k"])
        if not 2 <= k <= self.k_max:
            raise UnsupportedProblemError(f"n_clusters: this model supports 2 <= k <= {self.k_max} "
                                          f"(its centroid slots), got k={k}")
        return k

    def _check_d(self, d: int, name: str = "X") -> None:
        if d > self.d_max:
            raise UnsupportedProblemError(f"{name}: has {d} features but this model takes at most d={self.d_max} "
                                          f"(smaller d is zero-padded; reduce the dimension first, e.g. with PCA)")

    def trained_range(self, name: str) -> Optional[tuple[int, int]]:
        """(lo, hi) of k, d or n in the training episodes, from config.json (None when it does not say)."""
        trained = self.config.get("supported", {}).get(name, {}).get("trained")
        if not isinstance(trained, (list, tuple)) or len(trained) != 2:
            return None
        return int(trained[0]), int(trained[1])

    def _warn_outside_training(self, k: int, d: int, n: int) -> None:
        outside = []
        for name, value in (("k", k), ("d", d), ("n", n)):
            span = self.trained_range(name)
            if span is not None and not span[0] <= value <= span[1]:
                outside.append(f"{name}={value} (trained on {name} in [{span[0]}, {span[1]}])")
        if outside:
            warnings.warn(f"X: {', '.join(outside)} is outside the range this model was trained on; it runs, "
                          f"but was never trained there", OutOfRangeWarning, stacklevel=4)

    def _prepare(self, X: ArrayLike) -> tuple[np.ndarray, Optional[int], Optional[np.ndarray]]:
        """X checked against the model: (points (n, d) float64, k (None for 'auto'), given init (k, d) or None)."""
        points = as_points(X)
        k = None if self.n_clusters == AUTO else self._resolve_k(self.init)
        self._check_d(points.shape[1])
        need = self.k_min if k is None else k
        if points.shape[0] < need:
            raise InputError(f"X: {points.shape[0]} point(s) but n_clusters={k if k is not None else AUTO}: need at "
                             f"least as many points as clusters" + ("" if k is not None else f" ({need})"))
        distinct = len(np.unique(points, axis=0))
        if distinct < need:
            what = "all its points are identical" if distinct == 1 else f"it has only {distinct} distinct points"
            raise InputError(f"X: {what}, fewer than the {need} clusters asked for: nothing to cluster")
        init = None if isinstance(self.init, str) else self._given_init(self.init, k, points.shape[1])
        return points, k, init

    # ------------------------------------------------------------------ scikit-learn API
    def fit(self, X: ArrayLike, y: Any = None) -> "Clusterer":
        """Cluster X (n, d) in one episode; sets labels_, cluster_centers_, probabilities_."""
        for key, value in self._cluster(X).items():
            setattr(self, key, value)
        return self

    def _cluster(self, X: ArrayLike) -> dict[str, Any]:
        """fit's work, returned as the fitted attributes (predict_proba before fit stores nothing)."""
        points, k, init = self._prepare(X)
        mean, scale = self._standardization(points)
        k_proba = None
        if k is None:
            k_proba = self._k_proba(points, mean, scale)
            k = max(k_proba, key=k_proba.get)
        self._warn_outside_training(k, points.shape[1], points.shape[0])
        proba, init_used, score = self._episode(points, k, init, mean, scale, self.n_init, self.em_steps)
        return {"mean_": mean, "scale_": scale, "probabilities_": proba, "labels_": proba.argmax(1),
                "init_centers_": init_used, "cluster_centers_": _soft_centroids(points, proba, init_used),
                "n_features_in_": points.shape[1], "n_clusters_": k, "log_likelihood_": score, "k_proba_": k_proba}

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
            return self._cluster(X)["probabilities_"]
        points = as_points(X)
        if points.shape[1] != self.n_features_in_:
            raise InputError(f"X: has {points.shape[1]} features but the clusterer was fitted on {self.n_features_in_}")
        k = self.cluster_centers_.shape[0]
        if points.shape[0] < k:
            raise InputError(f"X: {points.shape[0]} point(s) but the clusterer has {k} clusters")
        return self._episode(points, k, self.cluster_centers_, self.mean_, self.scale_, 1, self.em_steps)[0]

    def predict(self, X: ArrayLike) -> np.ndarray:
        return self.predict_proba(X).argmax(1)

    def predict_k_proba(self, X: ArrayLike) -> dict[int, float]:
        """P(k | X) as {k: probability} over the k the model was trained on (at most X's distinct points): its
        count head, calibrated at export, weighed with the BIC of each k (models/calibration.py, `_k_evidence`)."""
        if not self.has_count_head:
            raise ParameterError("predict_k_proba: this model has no count head (trained without model.count_head)")
        points = as_points(X)
        self._check_d(points.shape[1])
        return self._k_proba(points, *self._standardization(points))

    # ------------------------------------------------------------------ batched API
    def predict_proba_batch(self, points: ArrayLike, mask: Optional[ArrayLike] = None,
                            init: Optional[ArrayLike] = None, kmask: Optional[ArrayLike] = None) -> torch.Tensor:
        """Soft assignments of many episodes at once: points [B, n, d] -> probabilities [B, n, k], a float32
        tensor on the clusterer's device (rows of padded points are 0, columns of padded clusters too).

        mask [B, n] (True = real point) lets episodes have different n. init [B, k, d] gives each episode's
        initial centroids in the points' coordinates; without it they come from `init` ("kmeans++" /
        "spectral", drawn with random_state). kmask [B, k] (True = real cluster) lets episodes have different
        k; k is init's second dimension, else n_clusters. Standardization, when on, is per episode over its
        real points, in float64. Episodes go through the model `batch_size` at a time. numpy or torch
        inputs; pass tensors already on the device to avoid copies. One start, no EM polish (n_init and
        em_steps are for fit).
        """
        x = float64_tensor(points, self.device)
        if x.ndim != 3 or 0 in x.shape:
            raise InputError(f"points: expected a non-empty array [B, n, d], got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise InputError("points: contains NaN or inf; drop or impute them first")
        batch, n, d = x.shape
        self._check_d(d, "points")
        m = self._batch_mask(mask, (batch, n), "mask")
        c = None
        if init is not None:
            c = float64_tensor(init, self.device)
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
            if self.n_clusters == AUTO:
                raise ParameterError("n_clusters: 'auto' is for fit; the batched API needs k (or init=[B, k, d])")
            k = self._resolve_k(self.init)
        km = self._batch_mask(kmask, (batch, k), "kmask")
        if (km.sum(1) < 1).any():
            raise InputError("kmask: every episode needs at least one real cluster")
        too_few = m.sum(1) < km.sum(1)
        if too_few.any():
            raise InputError(f"points: episode {int(too_few.nonzero()[0, 0])} has fewer real points than clusters")
        self._warn_outside_training(int(km.sum(1).max()), d, int(m.sum(1).max()))
        out = torch.zeros(batch, n, k, device=self.device)
        rng = np.random.default_rng(self.random_state)
        for start in range(0, batch, self.batch_size):
            part = slice(start, min(start + self.batch_size, batch))
            z, zinit = self._standardize_input(x[part], m[part], None if c is None else c[part], start)
            out[part] = self._forward_batch(z, m[part], zinit, km[part], rng)[0]
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

    @property
    def _trained_standardized(self) -> bool:
        """Whether the model was trained on episodes standardized by emformer.data.standardize (its rule and
        target then apply to X as they are); older exports have no such key."""
        return bool(self.config["task"].get("standardize"))

    def input_scale(self, d: int) -> float:
        """The per-feature spread standardized data gets at dimension d: for a model trained on standardized
        episodes (task.standardize), the very target they were standardized to; for one trained on raw
        episodes, their spread at that d (config.json's input_scale_by_d), so the noise reaches the model at
        the scale it was trained on."""
        if self._trained_standardized:
            return STANDARD_SCALE
        by_d = self.config.get("input_scale_by_d") or {}
        return float(by_d.get(str(d), self.config.get("input_scale", 1.0)))

    def _standardization(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, scale) per feature, z = (x - mean) / scale being the model's input; as _standardize_batch."""
        if not self.standardize:
            return np.zeros(points.shape[1]), np.ones(points.shape[1])
        x = torch.as_tensor(points)[None]
        mean, scale = _standardize_batch(x, torch.ones(x.shape[:2], dtype=torch.bool), self.standardize,
                                         self.input_scale(points.shape[1]), self._trained_standardized, "X")
        return mean[0, 0].numpy(), scale[0, 0].numpy()

    def _standardize_input(self, x: torch.Tensor, mask: torch.Tensor, init: Optional[torch.Tensor],
                           first: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """float64 episodes [b, n, d] (and init [b, k, d]) -> the model's float32 input, standardized per
        episode in float64 (so an offset far above the spread costs no precision)."""
        x = x * mask[..., None]
        if self.standardize:
            mean, scale = _standardize_batch(x, mask, self.standardize, self.input_scale(x.shape[-1]),
                                             self._trained_standardized, "points", first)
            x = (x - mean) / scale * mask[..., None]
            init = None if init is None else (init - mean) / scale
        return model_input(x, "points"), None if init is None else model_input(init, "init")

    def _episode(self, points: np.ndarray, k: int, init: Optional[np.ndarray], mean: np.ndarray, scale: np.ndarray,
                 n_init: int, em_steps: int) -> tuple[np.ndarray, np.ndarray, float]:
        """One episode from `n_init` starts (one batch), in standardized coordinates, polished by em_steps of
        EM; the start whose fitted mixture has the highest log-likelihood is kept. Returns (proba (n, k), its
        init in X's coordinates, its log-likelihood per point)."""
        starts = 1 if init is not None else n_init
        z = model_input(torch.as_tensor((points - mean) / scale, device=self.device), "X")[None].expand(starts, -1, -1)
        m = torch.ones(starts, z.shape[1], dtype=torch.bool, device=self.device)
        c = None if init is None else model_input(torch.as_tensor((init - mean) / scale, device=self.device),
                                                   "init")[None]
        rng = np.random.default_rng(self.random_state)
        kmask = torch.ones(starts, k, dtype=torch.bool, device=self.device)
        proba, init_used = self._forward_batch(z, m, c, kmask, rng)
        zd = torch.as_tensor((points - mean) / scale, device=self.device)[None].expand(starts, -1, -1)
        fit = baselines.em_from_responsibilities(zd, m, kmask, proba.double(), max(em_steps - 1, 0))
        if em_steps:
            proba = fit.log_resp.exp()
        best = int(torch.argmax(fit.log_likelihood))
        init_x = init_used[best, :k, : points.shape[1]].double().cpu().numpy() * scale + mean
        return proba[best].double().cpu().numpy(), init_x, float(fit.log_likelihood[best])

    def _k_proba(self, points: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> dict[int, float]:
        """P(k | X) over the k the model takes and X's distinct points allow."""
        ks, logits, bics = self._k_evidence(points, mean, scale, self.k_posterior.uses_bic)
        log_p = calibration.k_log_posterior(logits, bics, torch.tensor(float(len(points))), self.k_posterior)
        return {k: float(p) for k, p in zip(ks, log_p.exp().tolist())}

    def _k_evidence(self, points: np.ndarray, mean: np.ndarray, scale: np.ndarray, with_bic: bool
                    ) -> tuple[list[int], torch.Tensor, Optional[torch.Tensor]]:
        """What P(k | X) weighs: (the k, the count head's logits [K], with_bic: the BIC of each k [K], else
        None). The BIC is that of tied spherical EM (BIC_STARTS k-means++ starts, BIC_EM_ITERS iterations each,
        the most likely kept) in the standardized coordinates: model selection needs maximum-likelihood fits, which
        EM's iterations approach at a cost linear in n, where the model's own fits at every k (seven forward
        passes of `n_passes` each) cost more than the clustering itself."""
        standardized = torch.as_tensor((points - mean) / scale, device=self.device)  # float64
        z = torch.nn.functional.pad(model_input(standardized, "X")[None], (0, self.d_max - points.shape[1]))
        with torch.inference_mode():
            logits = self.model.count_logits(z, None)[0].double().cpu()  # one whole episode: no point is padded
        distinct = len(np.unique(points, axis=0))
        ks = [self.k_min + j for j in range(len(logits)) if self.k_min + j <= distinct]
        if not with_bic:
            return ks, logits[: len(ks)], None
        z = standardized[None].expand(BIC_STARTS, -1, -1)
        mask = torch.ones(BIC_STARTS, z.shape[1], dtype=torch.bool, device=self.device)
        rng = np.random.default_rng(self.random_state)
        likelihood = []
        for k in ks:
            kmask = torch.ones(BIC_STARTS, k, dtype=torch.bool, device=self.device)
            uniforms = torch.as_tensor(rng.random((BIC_STARTS, k)), device=self.device)
            starts = inits.kmeans_plus_plus(z, mask, kmask, uniforms)
            fit = baselines.em(z, mask, kmask, starts, BIC_EM_ITERS, covariance="tied")
            likelihood.append(float(fit.log_likelihood.max()))
        spread = int((np.ptp(points, axis=0) > 0).sum())
        bics = calibration.bic(torch.tensor(likelihood), torch.tensor(float(len(points))),
                               torch.tensor(float(max(spread, 1))), torch.tensor(ks))
        return ks, logits[: len(ks)], bics

    def k_evidence(self, X: ArrayLike) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """(the k, the count head's logits, the BIC of each k) of one data set: what the export fits P(k | X) on
        (models/calibration.py)."""
        if not self.has_count_head:
            raise ParameterError("k_evidence: this model has no count head (trained without model.count_head)")
        points = as_points(X)
        self._check_d(points.shape[1])
        return self._k_evidence(points, *self._standardization(points), True)

    def _forward_batch(self, x: torch.Tensor, mask: torch.Tensor, init: Optional[torch.Tensor], kmask: torch.Tensor,
                       rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """[b, n, d] standardized float32 points -> (probabilities [b, n, k], the model's init [b, k_max,
        d_max]): pad d and k, pick the init, run the model."""
        k = kmask.shape[1]
        pad_d = self.d_max - x.shape[-1]
        if pad_d:
            # Zero-padding keeps every distance and inner product, which is all the model compares.
            x = torch.nn.functional.pad(x, (0, pad_d))
            init = None if init is None else torch.nn.functional.pad(init, (0, pad_d))
        kmask = torch.nn.functional.pad(kmask, (0, self.k_max - k))  # unused slots are padded clusters
        if init is None:
            init = self._initial_centroids(x, mask, kmask, rng)
        else:
            init = torch.nn.functional.pad(init, (0, 0, 0, self.k_max - k)) * kmask[..., None]
        # No mask reaches attention when nothing is padded (all points real, k = the model's k_max), so that a
        # GPU may pick its fused SDPA kernels; one host sync per call, not per pass.
        point_mask = None if bool(mask.all()) else mask
        cluster_mask = None if k == self.k_max else kmask
        with torch.inference_mode():
            # Each pass starts from the last one's centroids, as in training (transformer.next_centroids).
            logits = self.model.forward_passes(x, point_mask, init, cluster_mask, passes=self.n_passes)[-1][0]
            proba = soft_assignment(logits, mask)
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


def _standardize_batch(x: torch.Tensor, mask: torch.Tensor, mode: Union[bool, str], input_scale: float,
                       own_only: bool, name: str = "points", first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-episode (mean [B,1,d], scale [B,1,d]) over the real points of x [B,n,d], in float64, by the rule of
    `emformer.data.standardize` (the one training episodes follow under task.standardize): isotropic (True)
    pools the variance over the features (those with spread when own_only, as for a model trained so; all
    of them for older exports), so their mean variance becomes input_scale²; features
    scales each feature to it. An episode without any spread, or whose spread overflows float64, is an
    InputError naming it (`first`: the index of x[0])."""
    rule = standardization(x, mask, per_feature=mode == "features", target=input_scale, own_only=own_only)
    where = (lambda b: name) if name == "X" else (lambda b: f"{name}: episode {first + b}")
    overflow = ~torch.isfinite(rule.var).all(-1).flatten()
    if overflow.any():
        b = int(overflow.nonzero()[0, 0])
        raise InputError(f"{where(b)}: the spread of the points overflows float64 (values up to "
                         f"{float(x[b].abs().max()):.3g}); rescale the data first (e.g. divide it by its largest value)")
    if rule.flat.any():
        b = int(rule.flat.nonzero()[0, 0])
        raise InputError(f"{where(b)}: all its points are identical (no spread); nothing to cluster")
    return rule.mean.to(x.dtype), rule.scale.to(x.dtype)


def _soft_centroids(points: np.ndarray, proba: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Centroids of a soft assignment; a cluster with (almost) no mass keeps its fallback centroid."""
    mass = proba.sum(0)
    centroids = proba.T @ points / np.maximum(mass, 1e-12)[:, None]
    empty = mass < 1e-6
    centroids[empty] = fallback[empty]
    return centroids
