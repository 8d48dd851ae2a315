"""Baselines: the oracle against the closed form, EM / Lloyd against scikit-learn, masks and padding."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from emformer.data import inits
from emformer.data.episodes import sample_episodes
from emformer.data.tasks import TaskSpec
from emformer.models import baselines, metrics

mixture = pytest.importorskip("sklearn.mixture")
cluster = pytest.importorskip("sklearn.cluster")


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


@pytest.mark.parametrize("delta", [2.0, 4.0, 6.0])
def test_oracle_error_matches_closed_form_for_two_equal_clusters(delta: float) -> None:
    spec = TaskSpec(k=2, d=3, n=500, separation=delta).validate()
    batch = sample_episodes(spec, seed=11, indices=range(400))  # 200,000 points
    pred = baselines.oracle_log_posterior(batch, spec).argmax(-1)
    err = metrics.anchored_error(pred, batch["labels"], batch["mask"]).double().mean().item()
    p = _phi(-delta / 2)
    se = math.sqrt(p * (1 - p) / batch["mask"].sum().item())
    assert abs(err - p) < 4 * se, (err, p, se)


def _episodes(spec: TaskSpec, count: int, seed: int = 3) -> dict[str, torch.Tensor]:
    return sample_episodes(spec.validate(), seed=seed, indices=range(count))


@pytest.mark.parametrize("covariance,noise", [("spherical", "isotropic"), ("diag", "diagonal")])
def test_em_agrees_with_sklearn(covariance: str, noise: str) -> None:
    iters = 8
    spec = TaskSpec(k=3, d=4, n=150, separation=3.0, noise=noise, init_noise=0.5)
    batch = _episodes(spec, 12)
    fit = baselines.em(batch["points"].double(), batch["mask"], batch["kmask"], batch["init"].double(), iters, covariance)
    # The initial shared variance, as em() computes it: mean squared distance to the nearest init / d, + reg.
    x, init = batch["points"].double(), batch["init"].double()
    var0 = (torch.cdist(x, init) ** 2).amin(-1).mean(-1) / spec.d + 1e-6
    agree = total = 0
    for b in range(batch["points"].shape[0]):
        k, d = spec.k, spec.d
        prec = np.full(k, 1 / var0[b].item()) if covariance == "spherical" else np.full((k, d), 1 / var0[b].item())
        ref = mixture.GaussianMixture(k, covariance_type=covariance, tol=0.0, max_iter=iters, reg_covar=1e-6,
                                      means_init=init[b].numpy(), weights_init=np.full(k, 1 / k),
                                      precisions_init=prec, init_params="random", random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 never "converges"
            labels = ref.fit_predict(x[b].numpy())
        np.testing.assert_allclose(fit.means[b].numpy(), ref.means_, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(fit.weights[b].numpy(), ref.weights_, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(fit.variances[b].numpy(), ref.covariances_, rtol=1e-4)
        agree += int((fit.log_resp[b].argmax(-1).numpy() == labels).sum())
        total += labels.size
    assert agree >= 0.999 * total


def test_lloyd_agrees_with_sklearn() -> None:
    iters = 6
    spec = TaskSpec(k=4, d=5, n=120, separation=3.0, init_noise=0.5)
    batch = _episodes(spec, 12)
    x, init = batch["points"].double(), batch["init"].double()
    centroids, labels = baselines.lloyd(x, batch["mask"], batch["kmask"], init, iters)
    for b in range(x.shape[0]):
        ref = cluster.KMeans(spec.k, init=init[b].numpy(), n_init=1, algorithm="lloyd", max_iter=iters, tol=0.0)
        ref.fit(x[b].numpy())
        np.testing.assert_allclose(centroids[b].numpy(), ref.cluster_centers_, rtol=1e-6, atol=1e-8)
        assert (labels[b].numpy() == ref.labels_).all()


def _pad(batch: dict[str, torch.Tensor], extra_points: int, extra_clusters: int) -> dict[str, torch.Tensor]:
    """The same episodes padded with garbage points (mask False) and garbage clusters (kmask False)."""
    g = torch.Generator().manual_seed(0)
    b, n, d = batch["points"].shape
    k = batch["kmask"].shape[1]
    junk = 100 * torch.randn(b, extra_points, d, generator=g)
    junk[:, 0, 0] = math.nan
    out = dict(batch)
    out["points"] = torch.cat([batch["points"], junk], 1)
    out["mask"] = torch.cat([batch["mask"], torch.zeros(b, extra_points, dtype=torch.bool)], 1)
    out["labels"] = torch.cat([batch["labels"], torch.full((b, extra_points), -1)], 1)
    out["init"] = torch.cat([batch["init"], 50 * torch.randn(b, extra_clusters, d, generator=g)], 1)
    out["kmask"] = torch.cat([batch["kmask"], torch.zeros(b, extra_clusters, dtype=torch.bool)], 1)
    return out


def test_masked_padding_changes_nothing() -> None:
    spec = TaskSpec(k=3, d=4, n=80, separation=4.0)
    batch = _episodes(spec, 6)
    padded = _pad(batch, extra_points=17, extra_clusters=2)
    n, k = spec.n, spec.k
    for covariance in ("spherical", "tied", "diag"):
        a = baselines.em(batch["points"], batch["mask"], batch["kmask"], batch["init"], 5, covariance)
        p = baselines.em(padded["points"], padded["mask"], padded["kmask"], padded["init"], 5, covariance)
        torch.testing.assert_close(p.means[:, :k], a.means, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p.log_resp[:, :n, :k], a.log_resp, rtol=1e-5, atol=1e-5)
        assert torch.all(p.log_resp[:, :, k:] == -math.inf)
        assert torch.all(p.weights[:, k:] == 0)
    ca, la = baselines.lloyd(batch["points"], batch["mask"], batch["kmask"], batch["init"], 5)
    cp, lp = baselines.lloyd(padded["points"], padded["mask"], padded["kmask"], padded["init"], 5)
    torch.testing.assert_close(cp[:, :k], ca)
    assert torch.equal(lp[:, :n], la) and torch.all(lp[:, n:] == -1)

    u = torch.rand(6, k + 2, generator=torch.Generator().manual_seed(5))
    for init_fn in (inits.kmeans_plus_plus, inits.spectral_init):
        ia = init_fn(batch["points"], batch["mask"], batch["kmask"], u[:, :k])
        ip = init_fn(padded["points"], padded["mask"], padded["kmask"], u)
        torch.testing.assert_close(ip[:, :k], ia, rtol=1e-5, atol=1e-5)
        assert torch.all(ip[:, k:] == 0)


def test_variable_n_and_k_in_one_batch_match_each_episode_alone() -> None:
    spec = TaskSpec(k=2, k_max=4, d=3, n=30, n_max=60, separation=4.0, noise="diagonal")
    batch = _episodes(spec, 8, seed=5)
    assert len(set(batch["k"].tolist())) > 1 and len(set(batch["n"].tolist())) > 1
    full = baselines.em(batch["points"], batch["mask"], batch["kmask"], batch["init"], 6, "diag")
    _, full_lloyd = baselines.lloyd(batch["points"], batch["mask"], batch["kmask"], batch["init"], 6)
    u = torch.rand(8, spec.k_pad, generator=torch.Generator().manual_seed(6))
    full_pp = inits.kmeans_plus_plus(batch["points"], batch["mask"], batch["kmask"], u)
    for b in range(8):
        n, k = int(batch["n"][b]), int(batch["k"][b])
        one = {key: batch[key][b:b + 1] for key in ("points", "mask", "kmask", "init")}
        pts, msk = one["points"][:, :n], one["mask"][:, :n]
        kms, ini = one["kmask"][:, :k], one["init"][:, :k]
        alone = baselines.em(pts, msk, kms, ini, 6, "diag")
        torch.testing.assert_close(full.means[b, :k], alone.means[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(full.log_resp[b, :n, :k], alone.log_resp[0], rtol=1e-4, atol=1e-4)
        assert torch.equal(full_lloyd[b, :n], baselines.lloyd(pts, msk, kms, ini, 6)[1][0])
        torch.testing.assert_close(full_pp[b, :k], inits.kmeans_plus_plus(pts, msk, kms, u[b:b + 1, :k])[0])


def test_tied_em_pools_one_variance_over_the_clusters_weighted_by_their_mass() -> None:
    """The tied M-step of a soft assignment: the spherical means and weights, and one variance, the
    responsibility-weighted mean squared distance per coordinate over every point and cluster (padded clusters
    and points out of it)."""
    spec = TaskSpec(k=3, d=4, n=50, separation=3.0)
    batch = _pad(_episodes(spec, 3), extra_points=5, extra_clusters=1)
    m, km = batch["mask"], batch["kmask"]
    x = batch["points"].double().masked_fill(~m[..., None], 0.0)  # what padding holds is not a point
    resp = torch.softmax(torch.randn(3, x.shape[1], km.shape[1], generator=torch.Generator().manual_seed(2),
                                     dtype=torch.float64).masked_fill(~km[:, None, :], -math.inf), -1)
    tied = baselines.em_from_responsibilities(x, m, km, resp, 0, "tied", reg=0.0)
    spherical = baselines.em_from_responsibilities(x, m, km, resp, 0, "spherical", reg=0.0)
    torch.testing.assert_close(tied.means, spherical.means)
    torch.testing.assert_close(tied.weights, spherical.weights)
    r = resp * m[..., None]
    distance = ((x[:, :, None, :] - tied.means.double()[:, None]) ** 2).sum(-1)  # [B, n, k]
    pooled = (r * distance).sum((1, 2)) / (r.sum((1, 2)) * spec.d)
    k = spec.k
    torch.testing.assert_close(tied.variances[:, :k].double(), pooled[:, None].expand(-1, k), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="'spherical', 'tied' or 'diag'"):
        baselines.em(x, m, km, batch["init"], 1, "full")


def test_spherical_em_ignores_dimension_padding() -> None:
    plain = _episodes(TaskSpec(k=3, d=4, n=60, separation=3.0), 4)
    padded = _episodes(TaskSpec(k=3, d=4, d_max=7, n=60, separation=3.0), 4)
    a = baselines.em(plain["points"], plain["mask"], plain["kmask"], plain["init"], 5)
    p = baselines.em(padded["points"], padded["mask"], padded["kmask"], padded["init"], 5)
    torch.testing.assert_close(p.log_resp, a.log_resp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.variances, a.variances)


def test_evaluate_baselines_keys_and_ordering() -> None:
    spec = TaskSpec(k=3, d=4, n=100, separation=4.0).validate()
    batch = sample_episodes(spec, 0, range(32))
    out = baselines.evaluate_baselines(batch, spec, em_iters=10, depth=2)
    assert set(out) == {"err_em", "err_em_anchored", "loss_em", "err_lloyd", "err_oracle", "err_oracle_anchored",
                        "loss_oracle", "err_em_depth", "err_em_depth_anchored"}
    for value in out.values():
        assert value.shape == (32,) and value.dtype == torch.float32 and torch.isfinite(value).all()
    # The oracle is the floor on average (cross-entropy is what it minimises in expectation).
    assert out["loss_oracle"].mean() <= out["loss_em"].mean()
    assert out["err_oracle"].mean() <= out["err_em"].mean() + 0.01


@pytest.mark.parametrize("noise", ["isotropic", "diagonal"])
def test_em_iterations_are_em_stopped_after_each_iteration(noise: str) -> None:
    spec = TaskSpec(k=3, d=4, n=80, separation=2.5, noise=noise, init_noise=0.8).validate()
    batch = sample_episodes(spec, 0, range(24))
    covariance = baselines.em_covariance(spec)
    args = (batch["points"], batch["mask"], batch["kmask"], batch["init"])
    path = baselines.em_iterations(*args, 4, covariance)
    assert len(path) == 4
    for t, fit in enumerate(path, start=1):
        alone = baselines.em(*args, t, covariance)
        assert torch.equal(fit.log_resp, alone.log_resp) and torch.equal(fit.means, alone.means)
    errors = baselines.em_iteration_errors(batch, spec, 4)
    assert errors.shape == (24, 4) and errors.dtype == torch.float32
    assert torch.equal(errors[:, 2], baselines.evaluate_baselines(batch, spec, em_iters=3)["err_em"])
    assert not torch.equal(errors[:, 0], errors[:, 3])


def test_oracle_student_t_beats_gaussian_rule_on_heavy_tails() -> None:
    spec = TaskSpec(k=2, d=2, n=400, separation=3.0, noise="student_t", noise_df=3.0).validate()
    batch = sample_episodes(spec, 2, range(100))
    t_err = metrics.anchored_error(baselines.oracle_log_posterior(batch, spec).argmax(-1), batch["labels"], batch["mask"])
    gauss = TaskSpec(**{**spec.to_dict(), "noise": "isotropic"})
    g_err = metrics.anchored_error(baselines.oracle_log_posterior(batch, gauss).argmax(-1), batch["labels"], batch["mask"])
    assert t_err.mean() <= g_err.mean()


def test_em_from_responsibilities_climbs_and_scores_like_sklearn():
    """EM from a soft assignment: the log-likelihood never falls with more iterations, and it is
    scikit-learn's GaussianMixture.score (mean log-likelihood per point) for the same spherical mixture."""
    from sklearn.mixture import GaussianMixture

    spec = TaskSpec(k=3, d=2, d_max=4, n=80, separation=2.0, init="kmeans++").validate()
    batch = sample_episodes(spec, 4, range(6))
    noisy = torch.softmax(torch.randn(6, 80, 3, generator=torch.Generator().manual_seed(0)), -1)
    fits = [baselines.em_from_responsibilities(batch["points"], batch["mask"], batch["kmask"], noisy, iters)
            for iters in (0, 1, 3, 10)]
    for before, after in zip(fits, fits[1:]):
        assert (after.log_likelihood >= before.log_likelihood - 1e-9).all()
    final = fits[-1]
    for b in range(6):
        gm = GaussianMixture(3, covariance_type="spherical")
        gm.weights_ = final.weights[b].double().numpy()
        gm.means_ = final.means[b, :, :2].double().numpy()
        gm.covariances_ = final.variances[b].double().numpy()
        gm.precisions_cholesky_ = 1 / np.sqrt(gm.covariances_)
        expected = gm.score(batch["points"][b, :, :2].double().numpy())  # the padded coordinates left out
        assert abs(float(final.log_likelihood[b]) - expected) < 1e-4
