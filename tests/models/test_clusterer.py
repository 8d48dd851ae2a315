"""`Clusterer`: the scikit-learn-style API over an exported model, its batched API, agreement with the
training run's own eval metrics, each bad input, and a light import (no lightning, no deepspeed)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from emformer import Clusterer
from emformer.errors import CheckpointError, EmformerError
from emformer.models.inputs import InputError, OutOfRangeWarning, ParameterError, UnsupportedProblemError
from export_fixtures import REPO, make_fake_run, subprocess_env


def _blobs(n: int, d: int, k: int, separation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k isotropic unit-variance blobs in d dims, means `separation` apart along the first axes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    means = np.zeros((k, d))
    for j in range(k):
        means[j, j % d] = separation * (j + 1) / 2 if j else 0.0
    return means[labels] + rng.normal(size=(n, d)), labels


@pytest.fixture()
def clusterer(fake_export: Path) -> Clusterer:
    return Clusterer.from_pretrained(fake_export, random_state=0)


# ------------------------------------------------------------------------------------------- API
def test_fit_predict_and_attributes(clusterer: Clusterer) -> None:
    X, _ = _blobs(40, 4, 2, 5.0, seed=0)
    labels = clusterer.fit_predict(X)
    assert labels.shape == (40,) and set(labels.tolist()) <= {0, 1}
    assert clusterer.probabilities_.shape == (40, 2)
    np.testing.assert_allclose(clusterer.probabilities_.sum(1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(labels, clusterer.probabilities_.argmax(1))
    assert clusterer.cluster_centers_.shape == (2, 4) and clusterer.init_centers_.shape == (2, 4)
    assert clusterer.n_features_in_ == 4
    # Raw k-means++ seeds (init_iters=0) are rows of X; by default Lloyd moves them off the data points.
    seeds = Clusterer.from_pretrained(clusterer.model_dir_, random_state=0, init_iters=0).fit(X).init_centers_
    assert all(np.abs(X - c).sum(1).min() < 1e-5 for c in seeds)
    assert not all(np.abs(X - c).sum(1).min() < 1e-5 for c in clusterer.init_centers_)
    # predict_proba after fit starts from the fitted centroids; before fit it equals fit's probabilities.
    fresh = Clusterer.from_pretrained(clusterer.model_dir_, random_state=0)
    np.testing.assert_allclose(fresh.predict_proba(X), clusterer.probabilities_, atol=1e-6)
    assert clusterer.predict(X).shape == (40,)
    assert "n_clusters=None" in repr(clusterer) and "k_max=2" in repr(clusterer)


def test_random_state_makes_it_reproducible(fake_export: Path) -> None:
    X, _ = _blobs(60, 4, 2, 3.0, seed=1)
    runs = [Clusterer.from_pretrained(fake_export, random_state=seed).fit(X).init_centers_ for seed in (7, 7, 8)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])  # another seed draws other k-means++ centroids


def test_given_centroids_and_spectral_init(fake_export: Path) -> None:
    X, _ = _blobs(50, 4, 2, 4.0, seed=2)
    given = X[:2] + 0.1
    c = Clusterer.from_pretrained(fake_export, init=given).fit(X)
    np.testing.assert_allclose(c.init_centers_, given, atol=1e-5)  # round trip through the standardization
    spectral = Clusterer.from_pretrained(fake_export, init="spectral", random_state=0).fit(X)
    assert spectral.labels_.shape == (50,)


def test_standardize_invariances(fake_export: Path) -> None:
    """isotropic (default): invariant to one scale and a shift; features: to a scale per feature."""
    X, _ = _blobs(60, 4, 2, 4.0, seed=3)
    shifted = X * 250.0 + np.array([50.0, -3.0, 0.0, 1e3])
    stretched = X * np.array([1000.0, 0.01, 3.0, 1.0]) + 50.0

    def proba(data: np.ndarray, **params) -> np.ndarray:
        return Clusterer.from_pretrained(fake_export, random_state=0, **params).predict_proba(data)

    np.testing.assert_allclose(proba(shifted), proba(X), atol=1e-4)
    np.testing.assert_allclose(proba(stretched, standardize="features"), proba(X, standardize="features"), atol=1e-4)
    assert np.abs(proba(stretched) - proba(X)).max() > 1e-2  # isotropic keeps the (stretched) shape
    assert np.abs(proba(shifted, standardize=False) - proba(X)).max() > 1e-2  # without it: other inputs
    with pytest.raises(ParameterError, match="standardize: expected True, False, 'isotropic' or 'features'"):
        Clusterer.from_pretrained(fake_export, standardize="zscore")


def test_smaller_d_is_zero_padded(fake_export: Path) -> None:
    """d=2 data on a d=4 model is the d=4 problem with two zero coordinates (documented padding)."""
    X, _ = _blobs(30, 2, 2, 4.0, seed=4)
    init = X[:2] + 0.2
    small = Clusterer.from_pretrained(fake_export, init=init, standardize=False).predict_proba(X)
    padded = Clusterer.from_pretrained(fake_export, init=np.pad(init, ((0, 0), (0, 2))),
                                       standardize=False).predict_proba(np.pad(X, ((0, 0), (0, 2))))
    np.testing.assert_allclose(small, padded, atol=1e-6)


def test_batched_api_matches_one_episode_at_a_time(fake_export: Path) -> None:
    """Episodes of different n in one padded batch give what each gives alone; batch_size chunks too."""
    sizes = (12, 30, 21)
    episodes = [_blobs(n, 4, 2, 4.0, seed=10 + i)[0] for i, n in enumerate(sizes)]
    inits = [x[:2] + 0.3 for x in episodes]
    points = np.zeros((3, 30, 4))
    mask = np.zeros((3, 30), dtype=bool)
    for i, x in enumerate(episodes):
        points[i, : len(x)], mask[i, : len(x)] = x, True
    batched = Clusterer.from_pretrained(fake_export, batch_size=2)
    proba = batched.predict_proba_batch(points, mask=mask, init=np.stack(inits))
    assert isinstance(proba, torch.Tensor) and proba.shape == (3, 30, 2)
    labels = batched.predict_batch(points, mask=mask, init=np.stack(inits))
    for i, x in enumerate(episodes):
        alone = Clusterer.from_pretrained(fake_export, init=inits[i]).predict_proba(x)
        np.testing.assert_allclose(proba[i, : len(x)].numpy(), alone, atol=1e-4)
        assert (proba[i, len(x):] == 0).all() and (labels[i, len(x):] == -1).all()
    # Without init: k-means++ per episode, drawn from random_state; several passes; one episode as fit's.
    for params in ({}, {"n_passes": 3, "standardize": "features"}):
        a = Clusterer.from_pretrained(fake_export, random_state=3, **params).predict_proba_batch(points, mask=mask)
        b = Clusterer.from_pretrained(fake_export, random_state=3, **params).predict_proba_batch(torch.as_tensor(points), mask=mask)
        torch.testing.assert_close(a, b)
        one = Clusterer.from_pretrained(fake_export, random_state=3, **params)
        np.testing.assert_allclose(one.predict_proba_batch(episodes[1][None])[0].numpy(), one.predict_proba(episodes[1]),
                                   atol=1e-4)


def test_no_attention_mask_reaches_the_model_when_nothing_is_padded(fake_export: Path) -> None:
    """Unpadded episodes at the model's k run attention unmasked (a GPU's fused SDPA kernels need no mask);
    a padded batch keeps its masks. The two paths agree on the real points (the test above)."""
    clusterer = Clusterer.from_pretrained(fake_export, random_state=0)
    seen: list[tuple[bool, bool]] = []
    forward = clusterer.model.forward_with_centroids  # each pass's
    clusterer.model.forward_with_centroids = lambda x, mask, init, kmask: (seen.append((mask is None, kmask is None)),
                                                                           forward(x, mask, init, kmask))[1]
    X = _blobs(40, 4, 2, 4.0, seed=1)[0]
    clusterer.predict_proba(X)
    assert seen and all(entry == (True, True) for entry in seen)
    seen.clear()
    points, mask = np.zeros((2, 40, 4)), np.ones((2, 40), dtype=bool)
    points[0], points[1, :30], mask[1, 30:] = X, X[:30], False
    clusterer.predict_proba_batch(points, mask=mask)
    assert seen and all(entry == (False, True) for entry in seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_api_on_gpu_matches_cpu(fake_export: Path) -> None:
    points = torch.randn(64, 50, 4)
    init = points[:, :2] + 0.1
    cpu = Clusterer.from_pretrained(fake_export).predict_proba_batch(points, init=init)
    gpu = Clusterer.from_pretrained(fake_export, device="cuda").predict_proba_batch(points.cuda(), init=init.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- a trained model
@pytest.mark.slow
def test_labels_agree_with_the_runs_eval_metrics(tiny_run: Path, tiny_export: Path) -> None:
    """On the run's own val set (same spec, seed, init centroids), the Clusterer's labels give exactly the
    mis-clustering rates the training run logged at the exported step."""
    from emformer.data.stream import eval_set
    from emformer.data.tasks import TaskSpec
    from emformer.models.metrics import anchored_error, misclustering_rate

    config = json.loads((tiny_export / "config.json").read_text())
    evaluation = config["training"]["run_config"]["eval"]
    batch = eval_set(TaskSpec.from_dict(config["task"]), int(evaluation["seed"]), int(evaluation["episodes"]))
    clusterer = Clusterer.from_pretrained(tiny_export, standardize=False, batch_size=100)
    pred = clusterer.predict_batch(batch["points"], batch["mask"], batch["init"], batch["kmask"])
    k = config["architecture"]["k_max"]
    err = float(misclustering_rate(pred, batch["labels"], batch["mask"], k).double().mean())
    anchored = float(anchored_error(pred, batch["labels"], batch["mask"]).double().mean())
    val = json.loads((tiny_run / "DONE").read_text())["val"]
    points = int(batch["mask"].sum())
    assert abs(err - val["err"]) <= 2 / points and abs(anchored - val["err_anchored"]) <= 2 / points
    assert config["selection"]["err"] == val["err"]
    # the card's figures: the same model on the test seed's episodes (not the val set it was selected on)
    test = eval_set(TaskSpec.from_dict(config["task"]), int(evaluation["test_seed"]), int(evaluation["episodes"]))
    pred = clusterer.predict_batch(test["points"], test["mask"], test["init"], test["kmask"])
    test_err = float(misclustering_rate(pred, test["labels"], test["mask"], k).double().mean())
    assert config["eval"]["seed"] == evaluation["test_seed"] != evaluation["seed"]
    assert abs(test_err - config["eval"]["err"]) <= 2 / int(test["mask"].sum())


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("X, message", [
    (np.array([[0.0, 1.0], [np.nan, 2.0], [3.0, 4.0]]), r"X: 1 non-finite value\(s\) \(NaN first at index \(1, 0\)\)"),
    (np.array([[0.0, np.inf], [1.0, 2.0], [3.0, 4.0]]), r"inf first at index \(0, 1\)"),
    (np.zeros(10), r"expected a 2-d array .* got 1-d"),
    (np.zeros((2, 10, 4)), r"got 3-d .* use predict_proba_batch"),
    (np.zeros((0, 4)), "empty array"),
    (np.zeros((1, 4)), r"1 point\(s\) but n_clusters=2"),
    (np.zeros((10, 5)), "has 5 features but this model takes at most d=4"),
    ([["a", "b"], ["c", "d"]], "expected a numeric array"),
])
def test_bad_X_is_named(clusterer: Clusterer, X, message: str) -> None:
    with pytest.raises((InputError, UnsupportedProblemError), match=message) as info:
        clusterer.fit_predict(X)
    assert isinstance(info.value, ValueError)  # what scikit-learn users catch
    assert isinstance(info.value, EmformerError)  # what the CLI prints as one line


def test_unsupported_k_and_bad_parameters(fake_export: Path) -> None:
    X = np.random.default_rng(0).normal(size=(20, 4))
    with pytest.raises(UnsupportedProblemError, match=r"supports 2 <= k <= 2 .* got k=3"):
        Clusterer.from_pretrained(fake_export, n_clusters=3).fit(X)
    with pytest.raises(UnsupportedProblemError, match="got k=1"):
        Clusterer.from_pretrained(fake_export, n_clusters=1).fit(X)
    with pytest.raises(ParameterError, match="init: expected one of kmeans\\+\\+, spectral"):
        Clusterer.from_pretrained(fake_export, init="random")
    with pytest.raises(ParameterError, match="n_passes: expected a positive integer"):
        Clusterer.from_pretrained(fake_export, n_passes=0)
    with pytest.raises(InputError, match=r"init: expected 2 centroids of dimension 4"):
        Clusterer.from_pretrained(fake_export, init=np.zeros((2, 3))).fit(X)
    with pytest.raises(InputError, match="init: .*non-finite"):
        Clusterer.from_pretrained(fake_export, init=np.full((2, 4), np.nan)).fit(X)
    with pytest.raises(ParameterError, match="unknown parameter 'k'"):
        Clusterer.from_pretrained(fake_export).set_params(k=2)
    clusterer = Clusterer.from_pretrained(fake_export)
    with pytest.raises(InputError, match=r"points: expected a non-empty array \[B, n, d\]"):
        clusterer.predict_proba_batch(np.zeros((5, 4)))
    with pytest.raises(InputError, match="points: contains NaN"):
        clusterer.predict_proba_batch(np.full((1, 5, 4), np.nan))
    with pytest.raises(UnsupportedProblemError, match="points: has 6 features"):
        clusterer.predict_proba_batch(np.zeros((1, 5, 6)))
    with pytest.raises(InputError, match=r"mask: expected shape \(2, 5\)"):
        clusterer.predict_proba_batch(np.zeros((2, 5, 4)), mask=np.ones((2, 4), bool))
    with pytest.raises(InputError, match="episode 1 has fewer real points than clusters"):
        clusterer.predict_proba_batch(np.zeros((2, 5, 4)), mask=np.array([[1] * 5, [1, 0, 0, 0, 0]], bool))
    with pytest.raises(UnsupportedProblemError, match="init: this model supports 2 <= k <= 2 centroids, got 3"):
        clusterer.predict_proba_batch(np.zeros((1, 5, 4)), init=np.zeros((1, 3, 4)))


def test_bad_model_directories(fake_export: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such export directory"):
        Clusterer.from_pretrained(tmp_path / "nope")

    def copy(name: str) -> Path:
        return Path(shutil.copytree(fake_export, tmp_path / name))

    missing = copy("missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        Clusterer.from_pretrained(missing)
    no_config = copy("no-config")
    (no_config / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing; .* is not an emformer export"):
        Clusterer.from_pretrained(no_config)
    mismatched = copy("mismatched")  # weights of another export: sha256 differs from config.json's
    from safetensors.torch import load_file, save_file

    weights = load_file(str(mismatched / "model.safetensors"))
    save_file({key: value + 1 for key, value in weights.items()}, str(mismatched / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not match .*config.json .*sha256"):
        Clusterer.from_pretrained(mismatched)
    reshaped = copy("reshaped")  # config.json edited by hand (no checksum): the weights do not fit
    config = json.loads((reshaped / "config.json").read_text())
    config["architecture"]["width"] = 64
    del config["files"]
    (reshaped / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"weights do not fit the architecture: shape mismatch"):
        Clusterer.from_pretrained(reshaped)
    broken = copy("broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        Clusterer.from_pretrained(broken)
    (broken / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="expected 'format': 'emformer-export'"):
        Clusterer.from_pretrained(broken)
    (broken / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99 is not supported"):
        Clusterer.from_pretrained(broken)


# ------------------------------------------------------------------------------------------- edges
def test_batched_api_centres_in_float64(fake_export: Path) -> None:
    """An offset far above the spread (+1e7) changes nothing: episodes are centred in float64 before the
    model's float32 input (a float32 cast first moved the probabilities by up to 0.05)."""
    X, _ = _blobs(32, 4, 2, 3.0, seed=5)
    init = X[:2] + 0.2
    clusterer = Clusterer.from_pretrained(fake_export)
    plain = clusterer.predict_proba_batch(X[None], init=init[None])
    for points, centroids in ((X + 1e7, init + 1e7), ((X + 1e7).tolist(), (init + 1e7).tolist())):
        shifted = clusterer.predict_proba_batch([points] if isinstance(points, list) else points[None],
                                                init=[centroids] if isinstance(centroids, list) else centroids[None])
        torch.testing.assert_close(shifted, plain, atol=1e-5, rtol=0)
    np.testing.assert_allclose(Clusterer.from_pretrained(fake_export, init=init + 1e7).predict_proba(X + 1e7),
                               plain[0].numpy(), atol=1e-5)


def test_outside_the_trained_range_warns_naming_it(fake_export: Path) -> None:
    """The fake export was trained on k = 2, d = 4, n = 32 exactly: inside runs quietly, outside warns."""
    config = json.loads((fake_export / "config.json").read_text())
    assert config["supported"]["n"]["min"] == "k" and config["supported"]["n"]["trained"] == [32, 32]
    X, _ = _blobs(32, 4, 2, 3.0, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Clusterer.from_pretrained(fake_export, random_state=0).fit(X)
    with pytest.warns(OutOfRangeWarning, match=r"n=40 \(trained on n in \[32, 32\]\)"):
        Clusterer.from_pretrained(fake_export, random_state=0).fit(_blobs(40, 4, 2, 3.0, seed=6)[0])
    with pytest.warns(OutOfRangeWarning, match=r"d=3 \(trained on d in \[4, 4\]\)"):
        Clusterer.from_pretrained(fake_export, random_state=0).fit(X[:, :3])
    with pytest.warns(OutOfRangeWarning, match=r"n=20 \(trained on n in \[32, 32\]\)"):
        Clusterer.from_pretrained(fake_export, random_state=0).predict_proba_batch(X[None, :20])


def test_degenerate_and_overflowing_input_are_clear_errors(fake_export: Path) -> None:
    X, _ = _blobs(32, 4, 2, 3.0, seed=7)
    clusterer = Clusterer.from_pretrained(fake_export, random_state=0)
    for bad, message in ((np.full((32, 4), 3.5), "all its points are identical"),
                         (np.repeat(X[:1], 32, axis=0), "all its points are identical"),
                         (X * 1e200, "the spread of the points overflows float64 .* rescale")):
        with pytest.raises(InputError, match=message) as info:
            clusterer.fit_predict(bad)
        assert isinstance(info.value, EmformerError) and "\n" not in str(info.value)
    with pytest.raises(InputError, match="points: episode 1: all its points are identical"):
        clusterer.predict_proba_batch(np.stack([X, np.ones_like(X)]))
    with pytest.raises(InputError, match="points: episode 0: the spread of the points overflows float64"):
        clusterer.predict_proba_batch((X * 1e200)[None])
    with pytest.raises(InputError, match="overflow the model's float32 input"):
        Clusterer.from_pretrained(fake_export, standardize=False, random_state=0).fit(X * 1e39)
    # Large but representable data is fine: the standardization takes the scale out.
    np.testing.assert_array_equal(clusterer.fit_predict(X * 1e100), clusterer.fit_predict(X))


def test_standardization_keeps_the_noise_scale_at_every_d(fake_export: Path) -> None:
    """Episodes of the model's task at any d <= d_in (σ = 1) reach the model with noise of scale ~1, as in
    training: the target spread is the training episodes' at that d, not at the trained d alone."""
    from emformer.data.episodes import sample_episodes
    from emformer.data.tasks import TaskSpec

    config = json.loads((fake_export / "config.json").read_text())
    task = TaskSpec.from_dict(config["task"])
    clusterer = Clusterer.from_pretrained(fake_export)
    scales = {d: clusterer.input_scale(d) for d in range(1, 5)}
    assert scales[4] == pytest.approx(config["input_scale"])
    old = {d: config["input_scale"] for d in scales}  # one scale for every d, as before
    check_noise = [(scales, True), (old, False)]
    old_off = {}
    for d in range(1, 5):
        batch = sample_episodes(TaskSpec(**{**task.to_dict(), "d": d}), 99, range(200))
        for target, keeps in check_noise:
            clusterer.input_scale = target.get  # the target spread at each d
            noise = []
            for points, labels in zip(batch["points"].double().numpy(), batch["labels"].numpy()):
                _, scale = clusterer._standardization(points)
                z = points / scale
                noise.append(np.mean([z[labels == j].var(0).mean() for j in range(2)]))
            off = abs(np.sqrt(np.mean(noise)) - 1)
            if keeps:
                assert off < 0.08, (d, off)
            else:
                old_off[d] = off
    assert old_off[1] > 0.1 and old_off[2] > 0.1, old_off  # one scale for every d missed the noise scale


def test_model_trained_on_standardized_episodes_sees_them_again(tmp_path: Path) -> None:
    """task.standardize: the Clusterer standardizes X to the very target the training episodes were
    standardized to, so raw episodes through the Clusterer reach the model as the sampler's standardized
    ones (points and init); one rule for both, including an episode's own d below the model's."""
    import dataclasses

    from emformer.data.episodes import sample_episodes
    from emformer.data.tasks import TaskSpec
    from emformer.train.export.command import export_run

    export = export_run(make_fake_run(tmp_path / "run", ("task.standardize=true",)), tmp_path / "export")
    config = json.loads((export / "config.json").read_text())
    clusterer = Clusterer.from_pretrained(export)
    assert config["task"]["standardize"] is True
    assert [clusterer.input_scale(d) for d in range(1, 5)] == [1.0] * 4
    spec = dataclasses.replace(TaskSpec.from_dict(config["task"]), standardize=False, d_min=1, n_max=48)
    raw = sample_episodes(spec, 5, range(12))
    std = sample_episodes(dataclasses.replace(spec, standardize=True), 5, range(12))
    dims = (raw["points"] != 0).any(1).sum(1)
    assert len(set(dims.tolist())) > 1
    for b in range(12):
        n, d = int(raw["n"][b]), int(dims[b])
        points = raw["points"][b, :n, :d].double().numpy()
        mean, scale = clusterer._standardization(points)
        np.testing.assert_allclose((points - mean) / scale, std["points"][b, :n, :d].numpy(), atol=1e-5)
        padded = raw["points"][b, :n].double().numpy()  # with the zero coordinates beyond its own d: the same
        mean, scale = clusterer._standardization(padded)
        np.testing.assert_allclose((padded - mean) / scale, std["points"][b, :n].numpy(), atol=1e-5)
    # the model's own output agrees too: raw episodes standardized by the Clusterer, standardized ones as they are
    fixed = dataclasses.replace(spec, d_min=None, n_max=None)
    raw, std = (sample_episodes(dataclasses.replace(fixed, standardize=on), 5, range(12)) for on in (False, True))
    ours = clusterer.predict_proba_batch(raw["points"], raw["mask"], init=raw["init"])
    theirs = Clusterer.from_pretrained(export, standardize=False).predict_proba_batch(std["points"], std["mask"],
                                                                                     init=std["init"])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_exports_from_before_task_standardize_keep_their_standardization(fake_export: Path, tmp_path: Path) -> None:
    """An export whose config.json predates task.standardize (no such key) standardizes as before: to the
    training episodes' spread at X's d (input_scale_by_d), not to 1."""
    old = tmp_path / "old"
    shutil.copytree(fake_export, old)
    config = json.loads((old / "config.json").read_text())
    assert config["task"].pop("standardize") is False
    (old / "config.json").write_text(json.dumps(config))
    before, now = Clusterer.from_pretrained(old, random_state=0), Clusterer.from_pretrained(fake_export, random_state=0)
    assert [before.input_scale(d) for d in range(1, 5)] == [config["input_scale_by_d"][str(d)] for d in range(1, 5)]
    assert before.input_scale(4) != pytest.approx(1.0, abs=0.05)
    X, _ = _blobs(32, 4, 2, 4.0, seed=3)
    np.testing.assert_array_equal(before.fit(X).probabilities_, now.fit(X).probabilities_)


def test_n_init_keeps_the_best_start_and_is_reproducible(fake_export: Path) -> None:
    X, _ = _blobs(32, 4, 2, 2.0, seed=8)
    one = Clusterer.from_pretrained(fake_export, random_state=3).fit(X)
    many = Clusterer.from_pretrained(fake_export, random_state=3, n_init=6).fit(X)
    again = Clusterer.from_pretrained(fake_export, random_state=3, n_init=6).fit(X)
    np.testing.assert_array_equal(many.labels_, again.labels_)
    # start 0 of the batch draws what n_init=1 draws, so the best of six is at least as likely
    assert many.log_likelihood_ >= one.log_likelihood_ - 1e-9
    with pytest.raises(ParameterError, match="n_init: expected a positive integer, got 0"):
        Clusterer.from_pretrained(fake_export, n_init=0)


def test_em_steps_polish_the_models_assignment(fake_export: Path) -> None:
    from emformer.models import baselines

    X, _ = _blobs(32, 4, 2, 2.5, seed=9)
    fits = {m: Clusterer.from_pretrained(fake_export, random_state=0, em_steps=m).fit(X) for m in (0, 1, 3)}
    base = Clusterer.from_pretrained(fake_export, random_state=0).fit(X)
    np.testing.assert_array_equal(fits[0].probabilities_, base.probabilities_)  # m = 0 is the model alone
    assert fits[0].log_likelihood_ <= fits[1].log_likelihood_ + 1e-9 <= fits[3].log_likelihood_ + 2e-9
    # one step: the M-step of the model's assignment, then the E-step (EM in the standardized coordinates)
    z = torch.as_tensor((X - base.mean_) / base.scale_)[None]
    ones = torch.ones(1, 32, dtype=torch.bool)
    step = baselines.em_from_responsibilities(z, ones, torch.ones(1, 2, dtype=torch.bool),
                                              torch.as_tensor(base.probabilities_)[None], 0)
    np.testing.assert_allclose(fits[1].probabilities_, step.log_resp.exp()[0].numpy(), atol=1e-5)
    with pytest.raises(ParameterError, match="em_steps: expected an integer >= 0"):
        Clusterer.from_pretrained(fake_export, em_steps=-1)


def test_auto_k_from_the_count_head(tmp_path: Path, fake_export: Path) -> None:
    from emformer.train.export.command import export_run

    run = make_fake_run(tmp_path / "run", ("task.k=2", "task.k_max=4", "model.count_head=true", "eval.episodes=48"))
    export = export_run(run, tmp_path / "export")
    X, _ = _blobs(40, 4, 3, 5.0, seed=10)
    clusterer = Clusterer.from_pretrained(export, n_clusters="auto", random_state=0)
    k_proba = clusterer.predict_k_proba(X)
    assert sorted(k_proba) == [2, 3, 4] and sum(k_proba.values()) == pytest.approx(1.0)
    # the BIC's tied-EM starts come from random_state: a seeded Clusterer gives the same P(k | X) every time
    # (docs/export.md)
    assert Clusterer.from_pretrained(export, n_clusters="auto", random_state=0).predict_k_proba(X) == k_proba
    clusterer.fit(X)
    assert clusterer.n_clusters_ == max(k_proba, key=k_proba.get) and clusterer.k_proba_ == pytest.approx(k_proba)
    # The export fitted P(k | X) on the eval set and measured it on the test set; the Clusterer pools the
    # count logits' and the BIC's votes on k with it.
    calibration = clusterer.config["count_head"]
    assert calibration["temperature"] > 0 and calibration["bic_weight"] >= 0
    assert calibration["bic_pool"] >= 0
    assert isinstance(calibration["bic_floor"], float) and isinstance(calibration["bic_floor_per_log_n"], float)
    assert calibration["fitted_on"]["seed"] != calibration["test"]["seed"]
    assert 0 <= calibration["test"]["ece"] <= 1 and 0 <= calibration["test_count_head_alone"]["k_accuracy"] <= 1
    ks, logits, bics = clusterer.k_evidence(X)
    assert ks == [2, 3, 4] and bics.shape == (3,)
    from emformer.models.calibration import KPosterior, k_log_posterior

    posterior = KPosterior(**{key: calibration[key] for key in KPosterior().to_dict()})
    want = k_log_posterior(logits, bics, torch.tensor(40.0), posterior).exp().numpy()
    np.testing.assert_allclose([k_proba[k] for k in ks], want, rtol=1e-6)
    assert clusterer.probabilities_.shape == (40, clusterer.n_clusters_)
    with pytest.raises(ParameterError, match="n_clusters: required, .* k in \\[2, 4\\] \\(or 'auto'\\)"):
        Clusterer.from_pretrained(export).fit(X)
    with pytest.raises(ParameterError, match="'auto' needs a model trained with a count head"):
        Clusterer.from_pretrained(fake_export, n_clusters="auto")
    with pytest.raises(ParameterError, match="predict_k_proba: this model has no count head"):
        Clusterer.from_pretrained(fake_export).predict_k_proba(X)


# ------------------------------------------------------------------------------------------- light import
def test_clusterer_loads_without_lightning_or_deepspeed(fake_export: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "from emformer import Clusterer\n"
        f"c = Clusterer.from_pretrained({str(fake_export)!r}, random_state=0)\n"
        "c.fit_predict(np.random.default_rng(0).normal(size=(20, 3)))\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'deepspeed',"
        " 'omegaconf', 'wandb', 'onnx', 'onnxruntime', 'sklearn'))\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HEAVY []" in result.stdout, result.stdout


# ------------------------------------------------------------------------------------------- the shipped model
def test_shipped_model_by_name() -> None:
    """pretrained/emformer-gmm-small loads by name with no training, picks k itself, and with k given and an
    EM polish clusters well-separated blobs it never saw."""
    X, truth = _blobs(120, 5, 3, 12.0, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # k = 3, d = 5, n = 120: inside the trained ranges
        auto = Clusterer.from_pretrained("emformer-gmm-small", n_clusters="auto", random_state=0)
        labels = auto.fit_predict(X)
    assert labels.shape == (120,) and 2 <= auto.n_clusters_ <= 8
    assert sum(auto.k_proba_.values()) == pytest.approx(1.0) and sorted(auto.k_proba_) == list(range(2, 9))
    given = Clusterer.from_pretrained("emformer-gmm-small", n_clusters=3, em_steps=3, n_init=4, random_state=0)
    from emformer.models.metrics import misclustering_rate

    err = misclustering_rate(torch.as_tensor(given.fit_predict(X))[None], torch.as_tensor(truth)[None],
                             torch.ones(1, 120, dtype=torch.bool), 3)
    assert float(err[0]) < 0.02


# ------------------------------------------------------------------------------------------------ passes
def test_n_passes_defaults_to_the_passes_the_model_was_trained_for(fake_export: Path, tmp_path: Path) -> None:
    """An export records model.passes in config.json's architecture; the Clusterer runs that many passes
    unless told otherwise. Exports without the key keep one pass, as before."""
    from emformer.train.export.command import export_run

    run = make_fake_run(tmp_path / "run", ("model.passes=3", "model.passes_min=1"))
    export = export_run(run, tmp_path / "export")
    assert json.loads((export / "config.json").read_text())["architecture"]["passes"] == 3
    clusterer = Clusterer.from_pretrained(export, random_state=0)
    assert clusterer.n_passes == 3 and Clusterer.from_pretrained(export, n_passes=5).n_passes == 5
    calls: list[int] = []
    single = clusterer.model.forward_with_centroids
    clusterer.model.forward_with_centroids = lambda *a: calls.append(1) or single(*a)
    clusterer.fit(_blobs(40, 4, 2, 4.0, seed=1)[0])
    assert len(calls) == 3
    old = tmp_path / "old"
    shutil.copytree(fake_export, old)
    config = json.loads((old / "config.json").read_text())
    for key in ("passes", "passes_min", "tied"):
        config["architecture"].pop(key)
    (old / "config.json").write_text(json.dumps(config))
    assert Clusterer.from_pretrained(old).n_passes == 1
    X = _blobs(40, 4, 2, 4.0, seed=2)[0]
    np.testing.assert_array_equal(Clusterer.from_pretrained(old, random_state=0).fit(X).probabilities_,
                                  Clusterer.from_pretrained(fake_export, random_state=0).fit(X).probabilities_)
    # the shipped model is trained to iterate, and its clusterer_defaults run it past its trained passes
    shipped = Clusterer.from_pretrained("emformer-gmm-small")
    assert shipped.n_passes == shipped.config["clusterer_defaults"]["n_passes"] > shipped.config["architecture"]["passes"] > 1
