"""Sampling GMM clustering episodes (DESIGN §1).

Episode `i` of seed `s` is a pure function of (spec, s, i): its random numbers are read from numpy's PCG64
stream keyed by (s, i >> BLOCK_BITS, purpose), at an offset set by i (`draw_words`; `Layout` says which word is
which), so any episode can be regenerated alone, shards can be written in parallel and a resumed stream sees
exactly what it would have seen. A run of consecutive indices is one `random_raw` call; everything else (words
to uniforms and Box-Muller normals, rescaling to Δ, labels, noise, init, anchoring, augmentation) is batched
torch and numpy arithmetic that IEEE 754 fixes (`emformer.exact`: no vendor log, sqrt, matmul or reduction),
so the same (spec, seed, index) is the same bits on every x86-64 CPU, thread count and math-library setting
(tests/data/test_cross_cpu.py).

Batch layout (all padded to the spec's k_pad / n_pad / d_pad):
  points [B,n,d] f32 · labels [B,n] i64 (-1 = padding) · mask [B,n] bool · means [B,k,d] · weights [B,k]
  scales [B,d] (per-axis noise scale) · sigma [B] · init [B,k,d] · kmask [B,k] bool · k [B] · n [B]
  separation [B] · seed [B] · index [B]
  noise_mode [B] i64 (task.noise = mixed only: 0 isotropic, 1 diagonal, 2 Student-t; tasks.MIXED_MODES)
With an init, component j of `means`/`weights`/`labels` is the one matched to init centroid j (Hungarian on
distances), so `labels` are the anchored cross-entropy targets.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import Sequence

import numpy as np
import torch

from emformer import exact
from emformer.data import inits
from emformer.data.standardize import standardization
from emformer.data.tasks import TaskSpec
from emformer.matching import best_assignment, padded_cost

Batch = dict[str, torch.Tensor]

EPISODE_KEYS = (
    "points", "labels", "mask", "means", "weights", "scales", "sigma", "init", "kmask",
    "k", "n", "separation", "seed", "index",
)


MAX_KEY = 2**63  # seeds and indices travel as int64 tensors


def _check_key(seed: int, index: int) -> None:
    if not (0 <= seed < MAX_KEY and 0 <= index < MAX_KEY):
        raise ValueError(f"seed and index must be in [0, 2**63), got seed={seed}, index={index}")


BLOCK_BITS = 10  # episodes share a stream in blocks of 2**BLOCK_BITS consecutive indices
_IN_BLOCK = (1 << BLOCK_BITS) - 1  # index & _IN_BLOCK: an episode's place in its block
# Purposes: separate streams for an episode's main words and its per-mode extras, so that switching
# task.translate or task.rotate moves or turns the very same episode.
MAIN, ROTATION, DIRICHLET, STUDENT_T, DIMS, NOISE_MODE = 0, 1, 2, 3, 4, 5
_TAG = 0x454D4634  # keeps these streams apart from other SeedSequence users of the same seeds


@functools.lru_cache(maxsize=4096)
def _stream_start(seed: int, block: int, purpose: int) -> dict:
    """The PCG64 state at the start of stream (seed, block, purpose): SeedSequence hashes the key, so
    neighbouring keys give unrelated streams."""
    return np.random.PCG64(np.random.SeedSequence([seed, block, purpose, _TAG])).state


# one reusable bit generator per thread: constructing one per run of indices costs more than the draw
_local = threading.local()


def _stream(seed: int, index: int, purpose: int, offset: int) -> np.random.PCG64:
    """This thread's PCG64 set to word `offset` of episode `index`'s block stream for `purpose`."""
    bitgen = getattr(_local, "bitgen", None)
    if bitgen is None:
        bitgen = _local.bitgen = np.random.PCG64(0)
    bitgen.state = _stream_start(seed, index >> BLOCK_BITS, purpose)
    return bitgen.advance(offset)


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """[start, stop) positions of the maximal runs of consecutive indices within one stream block."""
    if isinstance(indices, range) and indices.step == 1:  # a run, cut where a block starts
        cuts = range(-indices.start % (1 << BLOCK_BITS) or 1 << BLOCK_BITS, len(indices), 1 << BLOCK_BITS)
        bounds = [0, *cuts, len(indices)]
        return list(zip(bounds[:-1], bounds[1:]))
    runs, start = [], 0
    for pos in range(1, len(indices)):
        if indices[pos] != indices[pos - 1] + 1 or not indices[pos] & _IN_BLOCK:
            runs.append((start, pos))
            start = pos
    runs.append((start, len(indices)))
    return runs


def draw_words(seed: int, indices: Sequence[int], words: int, purpose: int = MAIN) -> np.ndarray:
    """[B, words] uint64: row b holds episode indices[b]'s `words` raw PCG64 outputs for `purpose`.

    Episode i reads stream (seed, i >> BLOCK_BITS, purpose) from word (i mod 2**BLOCK_BITS) · words on
    (PCG64 jumps ahead in O(log) steps), so consecutive indices of one block are consecutive stretches of one
    stream: a batch of 64 consecutive indices is one or two `random_raw` calls, random indices one seek each.
    """
    idx = indices if isinstance(indices, range) else list(indices)
    _check_key(seed, min(idx))
    _check_key(seed, max(idx))

    def run_words(start: int, stop: int) -> np.ndarray:  # one seek and one call: the words of idx[start:stop]
        first = idx[start]
        stream = _stream(seed, first, purpose, (first & _IN_BLOCK) * words)
        return stream.random_raw((stop - start) * words).reshape(stop - start, words)

    runs = _runs(idx)
    if len(runs) == 1:  # a batch of consecutive indices: its words are the batch, no copy
        return run_words(0, len(idx))
    out = np.empty((len(idx), words), dtype=np.uint64)
    for start, stop in runs:
        out[start:stop] = run_words(start, stop)
    return out


def _episode_rng(seed: int, index: int, purpose: int) -> np.random.Generator:
    """A generator of episode `index`'s own draws for `purpose` (variable-length ones, such as gammas by
    rejection): stream (seed, i >> BLOCK_BITS, purpose) from word (i mod 2**BLOCK_BITS) · 2**64, so no
    episode's draws can run into the next one's. It wraps this thread's one bit generator: use it before
    the next draw."""
    _check_key(seed, index)
    return np.random.Generator(_stream(seed, index, purpose, (index & _IN_BLOCK) << 64))


def _extra_gammas(seed: int, indices: Sequence[int], purpose: int, shape: float, size: int) -> torch.Tensor:
    """[B, size] float64 standard gammas of each episode, from its own `_episode_rng` for `purpose`."""
    out = np.empty((len(indices), size))
    for row, index in enumerate(indices):
        _episode_rng(seed, index, purpose).standard_gamma(shape, out=out[row])
    return torch.from_numpy(out)


class Layout:
    """Where each random number of an episode sits among its raw words (a function of the spec only).

    An episode's main draws are its `words` 64-bit PCG64 outputs for purpose MAIN (`draw_words`), read as
    32-bit halves: the first `2 · uniform_words` halves give uniforms in [0, 1) from 23 bits each, in
    the runs of `uniforms`; the rest give standard normals by Box-Muller, half j of the normal block paired
    with half j + normal_words (tails end at sqrt(2·23·ln 2) ≈ 5.6: one normal in 5·10⁷ is cut), in the runs
    of `normals`. Per-mode extras (the rotation, Dirichlet and Student-t gammas, the episode's own d) come from
    streams of other purposes.
    """

    def __init__(self, k: int, n: int, d: int) -> None:
        """k, n, d: the spec's padded cluster and point counts and its dimension (`Layout.of`)."""
        uniforms = {"choices": 3, "weights": k, "axis": d, "label_u": n, "init_u": 2 * k}
        normals = {"means": k * d, "noise": n * d, "init_noise": k * d, "offset": d}
        self.uniform_words = -(-sum(uniforms.values()) // 2)  # 64-bit words: two uniforms each
        self.normal_words = -(-sum(normals.values()) // 2)  # and one Box-Muller pair each
        self.words = self.uniform_words + self.normal_words
        self.uniforms = self._runs(uniforms)
        self.normals = self._runs(normals)

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def _of(k: int, n: int, d: int) -> "Layout":
        return Layout(k, n, d)

    @staticmethod
    def of(spec: TaskSpec) -> "Layout":
        """The layout of `spec` (it depends on its padded sizes only), built once per process."""
        return Layout._of(spec.k_pad, spec.n_pad, spec.d)

    @staticmethod
    def _runs(sizes: dict[str, int]) -> dict[str, slice]:
        runs, at = {}, 0
        for name, size in sizes.items():
            runs[name] = slice(at, at + size)
            at += size
        return runs


def _unit_floats(raw: np.ndarray) -> torch.Tensor:
    """uint64 words [B, W] -> float32 [B, 2W] in [1, 2), in place: 23 random mantissa bits of each 32-bit half
    under the exponent of 1 (two integer ops, no conversion, no new memory)."""
    halves = torch.from_numpy(raw.view(np.int32))
    return halves.bitwise_and_(0x7FFFFF).bitwise_or_(0x3F800000).view(torch.float32)


def _box_muller_(ones_to_twos: torch.Tensor) -> torch.Tensor:
    """[B, 2P] floats in [1, 2) -> standard normals, in place: column j pairs with column j + P
    (`exact.box_muller_normals`: the same bits on every CPU)."""
    exact.box_muller_normals(ones_to_twos.numpy())
    return ones_to_twos


def _draws(spec: TaskSpec, seed: int, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """Every random number a batch needs, by name: float32 uniforms and normals of `Layout`, plus the extras."""
    layout = Layout.of(spec)
    floats = _unit_floats(draw_words(seed, indices, layout.words))
    uniforms = floats[:, :2 * layout.uniform_words] - 1.0
    normals = _box_muller_(floats[:, 2 * layout.uniform_words:])
    out = {name: uniforms[:, run] for name, run in layout.uniforms.items()}
    out.update({name: normals[:, run] for name, run in layout.normals.items()})
    if spec.rotate:
        d = spec.d
        words = draw_words(seed, indices, -(-d * d // 2), ROTATION)
        out["rotation"] = _box_muller_(_unit_floats(words))[:, :d * d]
    if spec.weights == "dirichlet":
        out["gamma_weights"] = _extra_gammas(seed, indices, DIRICHLET, spec.weights_alpha, spec.k_pad)
    if spec.d_min is not None:  # the episode's own d
        out["dims_u"] = _unit_floats(draw_words(seed, indices, 1, DIMS))[:, 0].double() - 1.0
    if spec.noise == "mixed":  # which mode each episode has
        out["mode_u"] = _unit_floats(draw_words(seed, indices, 1, NOISE_MODE))[:, 0].double() - 1.0
    if spec.noise in ("student_t", "mixed"):  # t = z / sqrt(χ²_ν / ν) with χ²_ν = 2·Gamma(ν/2)
        out["gamma_noise"] = _extra_gammas(seed, indices, STUDENT_T, spec.noise_df / 2, spec.n_pad * spec.d)
    return out


def sample_episodes(spec: TaskSpec, seed: int, indices: Sequence[int] | torch.Tensor) -> Batch:
    """Episodes `indices` of `seed` under `spec`, as one padded batch (see module doc)."""
    if isinstance(indices, range) and indices.step == 1:  # the common case: no list of Python ints
        idx: Sequence[int] = indices
        index = torch.arange(indices.start, indices.stop)
    else:
        idx = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        index = torch.tensor(idx, dtype=torch.long)
    if not idx:
        raise ValueError("sample_episodes needs at least one index")
    batch = _transform(spec, _draws(spec, seed, idx))
    batch["seed"] = torch.full((len(idx),), seed, dtype=torch.long)
    batch["index"] = index
    return batch


def batch_chunks(batch: Batch, size: int) -> list[Batch]:
    """A batch split along the episode axis into consecutive views of at most `size` episodes."""
    total = next(iter(batch.values())).shape[0]
    return [{key: value[start:start + size] for key, value in batch.items()} for start in range(0, total, size)]


def _pick_int(lo: int, hi: int | None, u: torch.Tensor, log: bool = False) -> torch.Tensor:
    if hi is None or hi == lo:
        return torch.full(u.shape, lo, dtype=torch.long)
    u = u.double()
    if log:  # floor(exp(ln lo + u (ln(hi + 1) − ln lo))) >= j exactly when u >= the threshold of j
        return lo + torch.searchsorted(_log_uniform_thresholds(lo, hi), u, right=True)
    return (lo + torch.floor(u * (hi - lo + 1))).long().clamp(max=hi)


@functools.lru_cache(maxsize=64)
def _log_uniform_thresholds(lo: int, hi: int) -> torch.Tensor:
    """[hi − lo] float64: u at which a log-uniform integer in [lo, hi] reaches lo + 1, …, hi."""
    logs = exact.log(torch.arange(lo, hi + 2, dtype=torch.float64))
    return (logs[1:-1] - logs[0]) / (logs[-1] - logs[0])


def _transform(spec: TaskSpec, raw: dict[str, torch.Tensor]) -> Batch:
    f64 = torch.float64
    batch_size = raw["means"].shape[0]
    k_pad, n_pad, d = spec.k_pad, spec.n_pad, spec.d
    u = raw["choices"]
    k = _pick_int(spec.k, spec.k_max, u[:, 0])
    n = _pick_int(spec.n, spec.n_max, u[:, 1], log=spec.n_log)
    fixed_k, fixed_n = spec.k_max is None, spec.n_max is None
    dmask = None  # [B,d] 1 on the episode's own coordinates (task.d_min): the others stay exactly 0
    if spec.d_min is not None:
        dims = _pick_int(spec.d_min, d, raw["dims_u"])
        dmask = (torch.arange(d)[None, :] < dims[:, None]).to(f64)
        # Zero means and noise beyond the episode's d from the start: centring and rescaling keep them 0.
        own = dmask.float()[:, None, :]
        raw = {**raw, "means": raw["means"].reshape(batch_size, k_pad, d) * own,
               "noise": raw["noise"].reshape(batch_size, n_pad, d) * own}
    if spec.separation_max is None:
        delta = torch.full((batch_size,), float(spec.separation), dtype=f64)
    else:
        delta = spec.separation + u[:, 2].double() * (spec.separation_max - spec.separation)
    # With one k (or one n) the masks are all true: the fast paths skip them, fewer small ops.
    kmask = torch.ones(batch_size, k_pad, dtype=torch.bool) if fixed_k else torch.arange(k_pad)[None, :] < k[:, None]
    mask = torch.ones(batch_size, n_pad, dtype=torch.bool) if fixed_n else torch.arange(n_pad)[None, :] < n[:, None]

    # Means: random directions, centred, rescaled so the closest pair is exactly Δσ apart.
    if fixed_k:
        means = raw["means"].reshape(batch_size, k_pad, d).double()
        means = means - exact.fsum(means, 1, keepdim=True) / k_pad
        dist = exact.pairwise_sq_dist(means, means)
        dist.diagonal(dim1=1, dim2=2).fill_(math.inf)
    else:
        means = raw["means"].reshape(batch_size, k_pad, d).double() * kmask[..., None]
        centre = exact.fsum(means, 1, keepdim=True) / k[:, None, None]
        means = (means - centre) * kmask[..., None]
        pair_ok = kmask[:, :, None] & kmask[:, None, :] & ~torch.eye(k_pad, dtype=torch.bool)[None]
        dist = exact.pairwise_sq_dist(means, means).masked_fill_(~pair_ok, math.inf)
    min_dist = exact.sqrt(dist.flatten(1).amin(1))
    target = spec.separation * spec.sigma if spec.separation_max is None else delta * spec.sigma
    means = means.mul_((target / min_dist)[:, None, None])

    if spec.weights == "uniform" and fixed_k:
        weights = torch.full((batch_size, k_pad), 1.0 / spec.k, dtype=f64)
    else:
        if spec.weights == "dirichlet":
            weights = raw["gamma_weights"]
        elif spec.weights == "range":
            weights = spec.weights_lo + raw["weights"].double() * (spec.weights_hi - spec.weights_lo)
        else:
            weights = torch.ones(batch_size, k_pad, dtype=f64)
        weights = weights * kmask
        weights = weights / exact.fsum(weights, 1, keepdim=True)

    # Labels by inverse CDF (the number of cdf entries below u); clamp guards the last bin against rounding.
    if spec.weights == "uniform" and fixed_k:  # one k, equal bins: a floor by a scalar
        labels = (raw["label_u"] * spec.k).long().clamp_(max=spec.k - 1)
    else:
        if spec.weights == "uniform":  # equal bins: the CDF search is a floor
            labels = (raw["label_u"] * k[:, None]).long()
        else:
            labels = torch.searchsorted(weights.float().cumsum(1), raw["label_u"].contiguous())
        labels = torch.minimum(labels, k[:, None] - 1)

    mode = None  # task.noise = mixed: each episode's mode (tasks.MIXED_MODES codes)
    if spec.noise == "mixed":
        u_mode = raw["mode_u"]
        mode = torch.where(u_mode < spec.diagonal_share, 1,
                           torch.where(u_mode < spec.diagonal_share + spec.student_t_share, 2, 0)).long()
    if spec.noise in ("diagonal", "mixed"):  # log r uniform in ±log diag_ratio
        exponent = (2 * raw["axis"] - 1).double() * exact.log_scalar(spec.diag_ratio)
        scales = (spec.sigma * exact.exp(exponent)).float()  # [B, d]
        if mode is not None:
            scales = torch.where((mode == 1)[:, None], scales, torch.full_like(scales, float(spec.sigma)))
    else:
        scales = torch.full((batch_size, d), float(spec.sigma))
    noise = raw["noise"].reshape(batch_size, n_pad, d)
    if spec.noise in ("student_t", "mixed"):  # per axis, scaled to unit variance
        t_unit = math.sqrt((spec.noise_df - 2) / spec.noise_df)  # one correctly rounded double
        chi = exact.sqrt(raw["gamma_noise"] * (2 / spec.noise_df)).float().view(batch_size, n_pad, d)
        t_noise = noise / chi * t_unit
        noise = t_noise if mode is None else torch.where((mode == 2)[:, None, None], t_noise, noise)
    # centres[b, i] = means[b, labels[b, i]] by a flat index (index_select: several times faster than gather)
    flat = labels.add(torch.arange(0, batch_size * k_pad, k_pad)[:, None]).view(-1)
    centres = means.float().reshape(batch_size * k_pad, d).index_select(0, flat).view(batch_size, n_pad, d)
    # a product, then a sum: addcmul and add(alpha=) may fuse the two on one CPU and not on another
    if spec.noise in ("diagonal", "mixed"):
        points = centres.add_(noise * scales[:, None, :])
    else:  # one scalar σ: no broadcast over a [B, 1, d] factor, whose inner loop of d is slow
        points = centres.add_(noise * spec.sigma)
    if not fixed_n:  # with a fixed n the mask is all true: skip two full-size passes
        points = points * mask[..., None]
        labels = labels.masked_fill(~mask, -1)

    init = _initial_centroids(spec, points, mask, kmask, means, delta, raw, dmask)
    if spec.anchored:
        means, weights, labels = _anchor(means, weights, labels, init, None if fixed_k else kmask, fixed_n)
    points, means, init = _move(spec, raw, delta, points, mask, means, init, kmask)

    out: Batch = {
        "points": points, "labels": labels, "mask": mask, "means": means, "weights": weights,
        "scales": scales, "init": init, "kmask": kmask, "k": k, "n": n, "separation": delta.float(),
    }
    out["sigma"] = torch.full((batch_size,), float(spec.sigma))
    if mode is not None:
        out["noise_mode"] = mode
    out = _standardize(spec, out)
    if spec.d_pad > d:
        pad = spec.d_pad - d
        for key in ("points", "means", "init"):
            out[key] = torch.nn.functional.pad(out[key], (0, pad))
        out["scales"] = torch.nn.functional.pad(out["scales"], (0, pad))
    for key in ("points", "means", "weights", "scales", "init"):
        out[key] = out[key].float()
    return out


def _move(spec: TaskSpec, raw: dict[str, torch.Tensor], delta: torch.Tensor, points: torch.Tensor,
          mask: torch.Tensor, means: torch.Tensor, init: torch.Tensor,
          kmask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augmentation: rotate (Haar-random orthogonal Q) then translate the whole episode, so that no model can
    learn where the origin is or which axes the means lie on. Points, means and init move together, so
    labels, Δ, the anchoring and every distance stay as they were; padded points and clusters stay 0."""
    if not spec.rotate and not spec.translate:
        return points, means, init
    batch_size, d = points.shape[0], spec.d
    if spec.rotate:
        # Q of a Gaussian matrix's QR with R's diagonal positive (what Gram-Schmidt gives) is Haar (Mezzadri 2007).
        q = exact.gram_schmidt(raw["rotation"].reshape(batch_size, d, d).double())
        points = exact.matmul(points, q.float())
        means, init = exact.matmul(means, q), exact.matmul(init, q.to(init.dtype))
    if spec.translate:
        # Each coordinate of the shift is N(0, (translate·Δ·σ)²): the scale of the means' own spread.
        offset = raw["offset"].double() * (spec.translate * spec.sigma * delta)[:, None]  # [B, d]
        points = points + offset.float()[:, None, :]
        means = means + offset[:, None, :].to(means.dtype)
        init = init + offset[:, None, :].to(init.dtype)
    if spec.n_max is not None:
        points = points * mask[..., None]
    return points, means * kmask[..., None], init * kmask[..., None]


def _standardize(spec: TaskSpec, out: Batch) -> Batch:
    """task.standardize: each episode centred and scaled by `standardization` over its real points (its
    coordinates beyond its own d have no spread and do not count), as the Clusterer standardizes its input;
    means and init move with the points, the noise scales shrink with them (the oracle stays the true
    posterior), labels stay."""
    if not spec.standardize:
        return out
    rule = standardization(out["points"], out["mask"])
    mask, kmask = out["mask"][..., None], out["kmask"][..., None]
    moved = {key: ((out[key] - rule.mean) / rule.scale * keep).to(out[key].dtype)
             for key, keep in (("points", mask), ("means", kmask), ("init", kmask))}
    scale = rule.scale[:, 0, 0]  # one common scale per episode
    return {**out, **moved, "scales": (out["scales"] / scale[:, None]).to(out["scales"].dtype),
            "sigma": (out["sigma"] / scale).to(out["sigma"].dtype)}


def _initial_centroids(spec: TaskSpec, points: torch.Tensor, mask: torch.Tensor, kmask: torch.Tensor,
                       means: torch.Tensor, delta: torch.Tensor, raw: dict[str, torch.Tensor],
                       dmask: torch.Tensor | None) -> torch.Tensor:
    normals = raw["init_noise"].reshape(means.shape).double()
    if dmask is not None:  # noisy-truth noise on the episode's own coordinates only
        normals = normals * dmask[:, None, :]
    truth = inits.Truth(means=means, normals=normals, separation=delta,
                        sigma=spec.sigma, init_noise=spec.init_noise)
    return inits.initial_centroids(spec.init, inits.InitInputs(points, mask, kmask, raw["init_u"].double(), truth))


def _anchor(means: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor, init: torch.Tensor,
            kmask: torch.Tensor | None, fixed_n: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Relabel components so that component j is the one Hungarian-matched to init centroid j (kmask None:
    no padded clusters)."""
    cost = exact.pairwise_dist(means, init.to(means.dtype))
    if kmask is not None:
        cost = padded_cost(cost, kmask)
    perm = best_assignment(cost)  # perm[b, true component] = init slot
    slots = torch.arange(perm.shape[1]).expand_as(perm)
    inverse = torch.empty_like(perm).scatter_(1, perm, slots)  # inverse[b, slot] = true component
    means = torch.gather(means, 1, inverse[..., None].expand_as(means))
    weights = torch.gather(weights, 1, inverse)
    relabelled = torch.gather(perm, 1, labels if fixed_n else labels.clamp(min=0))
    labels = relabelled if fixed_n else torch.where(labels >= 0, relabelled, labels)
    return means, weights, labels
