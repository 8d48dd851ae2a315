"""Episodes: a pure function of (spec, seed, index); Δ, weights, padding and init exactly as the spec says."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from emformer.data.episodes import EPISODE_KEYS, sample_episodes
from emformer.data.tasks import TaskSpec
from emformer.errors import ConfigError
from emformer.models import baselines

VARIABLE = TaskSpec(k=2, k_max=4, d=3, d_max=6, n=16, n_max=32, separation=3.0, separation_max=6.0,
                    weights="dirichlet", noise="diagonal")
SPECS = {
    "fixed": TaskSpec(k=3, d=8, n=64),
    "variable": VARIABLE,
    "student_t": TaskSpec(k=2, d=2, n=20, noise="student_t", weights="range", init="none"),
}


def assert_same_episode(batch, row, single):
    for key in EPISODE_KEYS:
        assert torch.equal(batch[key][row], single[key][0]), key


@pytest.mark.parametrize("name", SPECS)
def test_episode_alone_equals_episode_in_batch(name):
    spec = SPECS[name]
    batch = sample_episodes(spec, 11, range(40, 56))
    for row in (0, 5, 15):
        assert_same_episode(batch, row, sample_episodes(spec, 11, [40 + row]))
    again = sample_episodes(spec, 11, torch.tensor([55, 40]))
    assert_same_episode(batch, 15, {k: v[:1] for k, v in again.items()})
    assert batch["seed"].eq(11).all() and batch["index"].tolist() == list(range(40, 56))


def test_different_seeds_and_indices_differ():
    spec = SPECS["fixed"]
    a, b = sample_episodes(spec, 0, range(4)), sample_episodes(spec, 1, range(4))
    assert not torch.allclose(a["points"], b["points"])
    assert not torch.allclose(a["points"][0], a["points"][1])


@pytest.mark.parametrize("name", ["fixed", "variable"])
def test_empirical_separation_is_exact(name):
    spec = SPECS[name]
    batch = sample_episodes(spec, 3, range(64))
    means, kmask = batch["means"].double(), batch["kmask"]
    dist = torch.cdist(means, means)
    pair = kmask[:, :, None] & kmask[:, None, :] & ~torch.eye(spec.k_pad, dtype=torch.bool)
    min_dist = dist.masked_fill(~pair, math.inf).amin(dim=(1, 2)) / batch["sigma"].double()
    torch.testing.assert_close(min_dist, batch["separation"].double(), rtol=1e-5, atol=0)
    hi = spec.separation_max if spec.separation_max is not None else spec.separation
    assert batch["separation"].min() >= spec.separation - 1e-5 and batch["separation"].max() <= hi + 1e-5
    if spec.separation_max is None:
        assert torch.allclose(batch["separation"], torch.full((64,), spec.separation))


def test_uniform_weights_and_label_frequencies():
    spec = TaskSpec(k=4, d=2, n=4000)
    batch = sample_episodes(spec, 0, range(8))
    assert torch.allclose(batch["weights"], torch.full((8, 4), 0.25))
    freq = torch.nn.functional.one_hot(batch["labels"], 4).float().mean(1)
    assert (freq - batch["weights"]).abs().max() < 0.035  # 4.5 binomial standard errors at n=4000


def test_dirichlet_weights_mean_and_spread():
    alpha, k, episodes = 2.0, 3, 3000
    batch = sample_episodes(TaskSpec(k=k, d=1, n=3, weights="dirichlet", weights_alpha=alpha), 0, range(episodes))
    w = batch["weights"].double()
    assert torch.allclose(w.sum(1), torch.ones(episodes, dtype=torch.double), atol=1e-6)
    # Symmetric Dirichlet: each coordinate has mean 1/k and variance (1/k)(1 - 1/k) / (k α + 1).
    sorted_w = torch.sort(w, dim=1).values  # anchoring permutes components: compare order-free statistics
    assert abs(w.mean().item() - 1 / k) < 1e-6
    var = (1 / k) * (1 - 1 / k) / (k * alpha + 1)
    assert abs(w.var().item() - var) < 0.1 * var
    assert sorted_w[:, 0].min() > 0


def test_range_weights_stay_in_their_ratio():
    spec = TaskSpec(k=3, d=2, n=10, weights="range", weights_lo=1.0, weights_hi=3.0)
    w = sample_episodes(spec, 0, range(2000))["weights"]
    ratio = w.max(1).values / w.min(1).values
    assert ratio.max() <= 3.0 + 1e-5 and ratio.max() > 2.5  # the full range is used
    # unnormalised u ~ U[1, 3]: the mean weight is 1/k and the spread is visible
    assert abs(w.mean().item() - 1 / 3) < 1e-6 and w.std() > 0.05


def test_variable_sizes_are_padded_with_masks():
    spec = VARIABLE
    b = sample_episodes(spec, 5, range(200))
    assert b["points"].shape == (200, 32, 6) and b["means"].shape == (200, 4, 6) and b["init"].shape == (200, 4, 6)
    assert b["labels"].shape == (200, 32) and b["kmask"].shape == (200, 4) and b["scales"].shape == (200, 6)
    assert torch.equal(b["mask"].sum(1), b["n"]) and torch.equal(b["kmask"].sum(1), b["k"])
    assert set(b["k"].tolist()) == {2, 3, 4} and b["n"].min() == 16 and b["n"].max() == 32
    assert (b["labels"][~b["mask"]] == -1).all() and (b["points"][~b["mask"]] == 0).all()
    valid = b["labels"][b["mask"]]
    k_of_point = b["k"][:, None].expand(-1, 32)[b["mask"]]
    assert (valid >= 0).all() and (valid < k_of_point).all()
    assert (b["points"][..., 3:] == 0).all() and (b["means"][..., 3:] == 0).all() and (b["init"][..., 3:] == 0).all()
    assert (b["means"][~b["kmask"]] == 0).all() and (b["weights"][~b["kmask"]] == 0).all()
    assert (b["init"][~b["kmask"]] == 0).all()
    assert torch.allclose(b["weights"].sum(1), torch.ones(200), atol=1e-6)
    # diagonal noise: per-axis scales in [σ / ratio, σ · ratio], padded axes zero
    scales = b["scales"][:, :3]
    assert scales.min() >= 0.5 - 1e-6 and scales.max() <= 2.0 + 1e-6 and (b["scales"][:, 3:] == 0).all()


@pytest.mark.parametrize("noise", ["isotropic", "student_t"])
def test_noise_has_unit_variance_per_axis(noise):
    spec = TaskSpec(k=2, d=4, n=2000, noise=noise, sigma=1.5, init="none")
    b = sample_episodes(spec, 0, range(4))
    centres = torch.gather(b["means"], 1, b["labels"][..., None].expand(-1, -1, 4))
    residual = (b["points"] - centres) / 1.5
    assert abs(residual.var().item() - 1.0) < 0.1


def test_noisy_truth_init_is_anchored():
    spec = TaskSpec(k=4, d=8, n=64, init_noise=0.05)
    b = sample_episodes(spec, 0, range(32))
    nearest = torch.cdist(b["init"], b["means"]).argmin(-1)  # init slot j sits next to component j
    assert torch.equal(nearest, torch.arange(4).expand(32, -1))
    exact = sample_episodes(TaskSpec(k=4, d=8, n=64, init_noise=0.0), 0, range(8))
    assert torch.equal(exact["init"], exact["means"])


def test_init_none_is_zero():
    b = sample_episodes(SPECS["student_t"], 0, range(4))
    assert (b["init"] == 0).all()


@pytest.mark.parametrize("init", ["kmeans++", "spectral"])
def test_data_driven_init_modes(init):
    spec = TaskSpec(k=3, k_max=4, d=3, n=24, n_max=40, separation=6.0, init=init)
    b = sample_episodes(spec, 2, range(12))
    assert b["init"].shape == (12, 4, 3) and torch.isfinite(b["init"]).all()
    assert (b["init"][~b["kmask"]] == 0).all()
    for row in (0, 7):
        assert_same_episode(b, row, sample_episodes(spec, 2, [row]))
    if init == "kmeans++":  # k-means++ seeds are data points of the episode
        for e in range(12):
            pts = b["points"][e][b["mask"][e]]
            dist = (b["init"][e][b["kmask"][e]][:, None] - pts[None]).norm(dim=-1).amin(-1)  # not cdist: mm rounding
            assert (dist < 1e-5).all()
    # anchoring: every point's label names an init slot of a real cluster
    assert (b["labels"][b["mask"]] < b["k"][:, None].expand(-1, 40)[b["mask"]]).all()


def test_negative_seed_or_index_is_refused():
    with pytest.raises(ValueError, match="seed"):
        sample_episodes(SPECS["fixed"], -1, [0])
    with pytest.raises(ValueError, match="index"):
        sample_episodes(SPECS["fixed"], 0, [-3])


def test_batched_draws_are_the_episode_generators_own():
    """Episode i's words are those of a fresh PCG64 seeded by SeedSequence (seed, i >> BLOCK_BITS, purpose)
    read from word (i mod 2**BLOCK_BITS) x words, whether drawn alone, at random, or inside a run of
    consecutive indices (one call) that crosses a block; purposes give different streams."""
    from emformer.data.episodes import _TAG, BLOCK_BITS, MAIN, ROTATION, draw_words

    words = 11
    keys = [(0, 0), (9, 2**40 + 5), (2**63 - 1, 5)]
    for purpose in (MAIN, ROTATION):
        for seed, index in keys:
            drawn = draw_words(seed, [7, index, 3], words, purpose)
            fresh = np.random.PCG64(np.random.SeedSequence([seed, index >> BLOCK_BITS, purpose, _TAG]))
            fresh.advance((index % 2**BLOCK_BITS) * words)
            assert np.array_equal(drawn[1], fresh.random_raw(words))
            assert np.array_equal(draw_words(seed, [index], words, purpose)[0], drawn[1])
            assert np.array_equal(draw_words(seed, range(index, index + 1), words, purpose)[0], drawn[1])
    assert not np.array_equal(draw_words(1, [3], words, MAIN), draw_words(1, [3], words, ROTATION))
    for run in (range(2**BLOCK_BITS - 40, 2**BLOCK_BITS + 30), range(2**BLOCK_BITS, 3 * 2**BLOCK_BITS + 2)):
        together = draw_words(4, run, words)  # crosses one or two blocks
        assert np.array_equal(together, draw_words(4, list(run), words))
        assert np.array_equal(together, np.concatenate([draw_words(4, [i], words) for i in run]))
        assert len({row.tobytes() for row in together}) == len(run)
    with pytest.raises(ValueError, match="2\\*\\*63"):  # indices travel as int64
        sample_episodes(SPECS["fixed"], 2**63, [0])


def test_variable_length_draws_cannot_overlap():
    """Gammas by rejection take as many words as they need: each episode's own stream starts 2**64 words
    after the previous episode's, and the draws of an episode do not depend on its batch."""
    from emformer.data.episodes import DIRICHLET, _extra_gammas

    alone = torch.cat([_extra_gammas(3, [i], DIRICHLET, 0.5, 4) for i in (1, 2, 1500)])
    torch.testing.assert_close(_extra_gammas(3, [1, 2, 1500], DIRICHLET, 0.5, 4), alone, rtol=0, atol=0)
    assert len({tuple(row.tolist()) for row in alone}) == 3


def test_box_muller_normals_and_uniforms_have_their_laws():
    from scipy import stats

    from emformer.data.episodes import Layout, _draws

    spec = TaskSpec(k=3, d=8, n=256)
    raw = _draws(spec, 5, range(64))
    normals = raw["noise"].double().flatten().numpy()  # 131,072 draws
    assert stats.kstest(normals, "norm").pvalue > 1e-3
    assert abs(normals.mean()) < 0.02 and abs(normals.std() - 1) < 0.01
    uniforms = raw["label_u"].double().flatten().numpy()
    assert uniforms.min() >= 0 and uniforms.max() < 1 and stats.kstest(uniforms, "uniform").pvalue > 1e-3
    layout = Layout.of(spec)  # every run lies inside the words drawn
    assert max(r.stop for r in layout.uniforms.values()) <= 2 * layout.uniform_words
    assert max(r.stop for r in layout.normals.values()) <= 2 * layout.normal_words


def test_separation_range_is_uniform():
    spec = TaskSpec(k=2, d=2, n=4, separation=2.0, separation_max=6.0)
    delta = sample_episodes(spec, 1, range(4000))["separation"].double()
    # U[2, 6]: mean 4, sd 4/sqrt(12) = 1.155; the mean of 4000 has sd 0.018
    assert abs(delta.mean().item() - 4.0) < 0.08 and abs(delta.std().item() - 4 / math.sqrt(12)) < 0.05
    quarter = ((delta - 2.0) / 4.0 * 4).long().clamp(max=3)
    assert torch.bincount(quarter, minlength=4).min() > 900  # each quarter of the range ~1000 times


def test_label_frequencies_follow_random_weights():
    spec = TaskSpec(k=3, d=2, n=2000, weights="dirichlet", weights_alpha=1.0)
    b = sample_episodes(spec, 4, range(16))
    freq = torch.nn.functional.one_hot(b["labels"], 3).double().mean(1)
    w = b["weights"].double()
    z = (freq - w) / torch.sqrt(w * (1 - w) / 2000).clamp(min=1e-9)
    assert z.abs().max() < 5 and (w.max(1).values - w.min(1).values).mean() > 0.2  # weights really differ


def test_diagonal_noise_scales_each_axis():
    spec = TaskSpec(k=2, d=3, n=3000, noise="diagonal", diag_ratio=3.0, sigma=2.0, init="none")
    b = sample_episodes(spec, 6, range(4))
    centres = torch.gather(b["means"], 1, b["labels"][..., None].expand(-1, -1, 3))
    sd = (b["points"] - centres).std(dim=1)  # [B, d] empirical per-axis noise
    torch.testing.assert_close(sd, b["scales"], rtol=0.06, atol=0)
    assert b["scales"].min() >= 2.0 / 3 - 1e-5 and b["scales"].max() <= 6.0 + 1e-5
    assert (b["scales"].max(1).values / b["scales"].min(1).values).min() > 1.05  # not isotropic


def test_mixed_noise_episodes_are_those_of_their_own_mode_and_the_oracle_follows():
    # Each episode of a mixed task is bit for bit the episode its own mode's task gives (the mode is drawn
    # from a stream of its own), so the mixture changes which noise an episode has and nothing else.
    common = dict(k=2, k_max=4, d=3, d_min=2, n=24, n_max=40, weights="range", init="kmeans++", standardize=True)
    mixed_spec = TaskSpec(**common, noise="mixed", diagonal_share=0.3, student_t_share=0.3).validate()
    mixed = sample_episodes(mixed_spec, 11, range(400))
    modes = mixed["noise_mode"]
    assert set(modes.tolist()) == {0, 1, 2}
    assert abs(float((modes == 1).double().mean()) - 0.3) < 0.08 and abs(float((modes == 2).double().mean()) - 0.3) < 0.08
    for code, noise in enumerate(("isotropic", "diagonal", "student_t")):
        alone = sample_episodes(TaskSpec(**common, noise=noise).validate(), 11, range(400))
        rows = modes == code
        for key in EPISODE_KEYS:
            assert torch.equal(mixed[key][rows], alone[key][rows]), (noise, key)
        oracle = baselines.oracle_log_posterior({k: v[rows] for k, v in mixed.items()}, mixed_spec)
        own = baselines.oracle_log_posterior({k: v[rows] for k, v in alone.items()},
                                             TaskSpec(**common, noise=noise).validate())
        torch.testing.assert_close(oracle, own, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("shares, key", [((0.7, 0.5), "student_t_share"), ((-0.1, 0.2), "diagonal_share")])
def test_mixed_noise_shares_are_checked(shares, key):
    with pytest.raises(ConfigError, match=f"task.{key}"):
        TaskSpec(noise="mixed", diagonal_share=shares[0], student_t_share=shares[1]).validate()


def test_mixed_noise_oracle_needs_the_episodes_noise_mode():
    spec = TaskSpec(k=2, d=2, n=20, noise="mixed").validate()
    batch = sample_episodes(spec, 0, range(2))
    del batch["noise_mode"]
    with pytest.raises(ValueError, match="noise_mode"):
        baselines.oracle_log_posterior(batch, spec)


def test_translate_moves_the_same_episode_and_everything_with_it():
    spec = TaskSpec(k=3, k_max=4, d=3, d_max=5, n=20, n_max=30, separation=3.0, separation_max=5.0)
    still = sample_episodes(spec, 8, range(64))
    moved = sample_episodes(dataclasses.replace(spec, translate=2.0), 8, range(64))
    for key in ("labels", "mask", "kmask", "weights", "separation", "k", "n"):
        assert torch.equal(still[key], moved[key]), key
    shift = moved["means"][:, 0] - still["means"][:, 0]  # [B, d_pad]: one offset an episode
    for key, valid in (("points", moved["mask"]), ("means", moved["kmask"]), ("init", moved["kmask"])):
        delta = moved[key] - still[key]
        torch.testing.assert_close(delta[valid], shift[:, None].expand_as(delta)[valid], atol=1e-4, rtol=0)
        assert (moved[key][~valid] == 0).all(), key  # padding stays zero
    assert (shift[:, 3:] == 0).all()  # only the first d coordinates move
    # each coordinate ~ N(0, (2·Δ·σ)²)
    z = shift[:, :3] / (2.0 * moved["separation"][:, None])
    assert abs(z.std().item() - 1.0) < 0.15 and abs(z.mean().item()) < 0.2


def test_rotate_turns_the_same_episode_by_an_orthogonal_matrix():
    spec = TaskSpec(k=3, d=4, d_max=6, n=40, init="kmeans++")
    still = sample_episodes(spec, 2, range(32))
    turned = sample_episodes(dataclasses.replace(spec, rotate=True), 2, range(32))
    assert torch.equal(still["labels"], turned["labels"])
    # the map from still to turned points is one orthogonal Q an episode, and it also carries means and init
    x, y = still["points"][..., :4].double(), turned["points"][..., :4].double()
    q = torch.linalg.lstsq(x, y).solution  # [B, 4, 4]
    torch.testing.assert_close(q.transpose(1, 2) @ q, torch.eye(4, dtype=torch.double).expand(32, 4, 4), atol=1e-4,
                               rtol=0)
    for key in ("means", "init"):
        torch.testing.assert_close(still[key][..., :4].double() @ q, turned[key][..., :4].double(), atol=1e-4, rtol=0)
    assert (turned["points"][..., 4:] == 0).all()
    assert not torch.allclose(x, y, atol=0.1)  # really turned
    # Haar: the first column's first entry is uniform-ish on [-1, 1] with mean 0 and variance 1/d
    q_all = torch.linalg.lstsq(x, y).solution[:, 0, 0]
    assert abs(q_all.mean().item()) < 0.25


@pytest.mark.parametrize("extra", [{"translate": 1.5}, {"rotate": True}, {"translate": 0.5, "rotate": True}])
def test_augmented_episode_alone_equals_episode_in_batch(extra):
    spec = dataclasses.replace(VARIABLE, noise="isotropic", **extra)
    batch = sample_episodes(spec, 4, range(10, 26))
    for row in (0, 9):
        assert_same_episode(batch, row, sample_episodes(spec, 4, [10 + row]))


@pytest.mark.parametrize("extra", [{"d_min": 2}, {"translate": 1.0, "rotate": True}])
def test_standardized_episodes_have_the_target_statistics(extra):
    """task.standardize: the same episodes, centred and scaled per episode over their real points and own
    coordinates to a mean per-coordinate variance of 1 (what the Clusterer does to X); means, init and the
    noise scales move with the points, so labels, Δ, the anchoring and the oracle's posterior stay."""
    spec = TaskSpec(k=2, k_max=5, d=6, d_max=8, n=30, n_max=60, separation=3.0, separation_max=6.0,
                    weights="range", init="kmeans++", **extra).validate()
    raw = sample_episodes(spec, 3, range(40))
    std = sample_episodes(dataclasses.replace(spec, standardize=True), 3, range(40))
    for key in ("labels", "mask", "kmask", "weights", "separation", "k", "n"):
        assert torch.equal(raw[key], std[key]), key
    dims = (raw["points"] != 0).any(1).sum(1)  # each episode's own d
    assert set(dims.tolist()) == ({2, 3, 4, 5, 6} if "d_min" in extra else {6})
    for b in range(40):
        n, d = int(std["n"][b]), int(dims[b])
        x = std["points"][b, :n].double()
        torch.testing.assert_close(x.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-5, rtol=0)
        assert abs(float(x.var(0, unbiased=False).sum()) / d - 1.0) < 1e-5  # own coordinates only
        # one affine map per episode carries points, means and init: z = (x - c) / s
        scale = float(raw["sigma"][b] / std["sigma"][b])
        centre = raw["points"][b, :n].double().mean(0)
        for key, real in (("points", std["mask"][b]), ("means", std["kmask"][b]), ("init", std["kmask"][b])):
            expect = (raw[key][b].double() - centre) / scale
            torch.testing.assert_close(std[key][b][real].double(), expect[real], atol=1e-4, rtol=1e-4)
            assert (std[key][b][~real] == 0).all() and (std[key][b][:, d:] == 0).all(), key  # padding stays 0
        torch.testing.assert_close(std["scales"][b, :6], raw["scales"][b, :6] / scale)
    assert float(std["sigma"].max()) < 1.0  # Δ ≥ 3: the spread is mostly between clusters
    posterior = [baselines.oracle_log_posterior(b, spec).exp()[raw["mask"]] for b in (raw, std)]
    torch.testing.assert_close(posterior[0], posterior[1], atol=1e-5, rtol=0)


def test_episode_dimension_range_zeroes_the_coordinates_beyond_it():
    """task.d_min: each episode has its own d in [d_min, d]; the coordinates beyond it are exactly zero and Δ
    holds over the others; a spec without d_min keeps its episodes (the d draw comes last)."""
    spec = TaskSpec(k=3, d=6, d_min=2, n=40, separation=3.0, init="kmeans++").validate()
    b = sample_episodes(spec, 3, range(300))
    active = (b["points"] != 0).any(1)  # [B, d]
    dims = active.sum(1)
    assert set(dims.tolist()) == {2, 3, 4, 5, 6}
    assert torch.equal(active, torch.arange(6)[None] < dims[:, None])  # a prefix of the coordinates
    assert (b["means"].abs().sum(1)[~active] == 0).all() and (b["init"].abs().sum(1)[~active] == 0).all()
    gaps = torch.cdist(b["means"].double(), b["means"].double())
    gaps = gaps + torch.eye(3, dtype=torch.float64) * 1e9
    torch.testing.assert_close(gaps.amin((1, 2)), b["separation"].double(), atol=1e-4, rtol=1e-4)
    fixed = TaskSpec(k=3, d=6, n=40, separation=3.0)
    assert torch.equal(sample_episodes(fixed, 3, range(5))["points"],
                       sample_episodes(dataclasses.replace(fixed, d_min=6), 3, range(5))["points"])


def test_log_uniform_n():
    """task.n_log: n is log-uniform in [n, n_max]: as many episodes below the geometric middle as above."""
    spec = TaskSpec(k=2, d=2, n=8, n_max=512, n_log=True).validate()
    n = sample_episodes(spec, 0, range(2000))["n"].double()
    assert n.min() >= 8 and n.max() <= 512 and n.max() > 400
    below = float((n < 64).double().mean())  # 64 = sqrt(8 * 512)
    assert 0.45 < below < 0.55, below
    uniform = sample_episodes(TaskSpec(k=2, d=2, n=8, n_max=512).validate(), 0, range(2000))["n"].double()
    assert float((uniform < 64).double().mean()) < 0.15


GOLDEN_SPECS = {  # every mode of the sampler at least once
    "reference": dict(k=3, d=8, n=256),
    "ranged": dict(k=2, k_max=5, d=4, d_max=6, n=20, n_max=60, separation=2.0, separation_max=5.0),
    "modes": dict(k=4, d=3, n=50, weights="dirichlet", weights_alpha=0.7, noise="student_t", noise_df=5.0),
    "moved": dict(k=3, d=5, d_min=2, n=30, noise="diagonal", init="kmeans++", standardize=True),
    "rotated": dict(k=3, d=3, n=20, translate=2.0, rotate=True, init="none"),
}
GOLDEN = {  # sha256 of every key of episodes [5, 1023, 1024, 2**40] of seed 11, recorded at EPISODES_VERSION 5
    "reference": "0d1abfc6dbe2d4ab4b1b34242b8690e1",
    "ranged": "ba1ad0819b8ff3a97dd71544f6e128d3",
    "modes": "dcb06fcda39af1faf571a84005c94fd7",
    "moved": "4b842422b96455f7871924ed72bf724a",
    "rotated": "fb87c366951cd1d6732f5b71be54eadc",
}


@pytest.mark.parametrize("name", GOLDEN)
def test_episodes_are_those_of_their_version(name):
    """A change to the sampler that changes any episode must bump tasks.EPISODES_VERSION (run names and shard
    formats follow it) and re-record these fingerprints; one that does not (a faster path) leaves them.
    The values hold on any x86-64 CPU: test_cross_cpu.py checks the sampler under other CPUs' code paths."""
    import hashlib

    from emformer.data.tasks import EPISODES_VERSION

    batch = sample_episodes(TaskSpec(**GOLDEN_SPECS[name]), 11, [5, 1023, 1024, 2**40])
    digest = hashlib.sha256()
    for key in EPISODE_KEYS:
        digest.update(batch[key].contiguous().numpy().tobytes())
    assert EPISODES_VERSION == 5 and digest.hexdigest()[:32] == GOLDEN[name]
