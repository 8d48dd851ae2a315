"""`Clusterer`: the scikit-learn-style API over an exported model, its batched API, agreement with the
training run's own eval metrics, each bad input, and a light import (no lightning, no deepspeed)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from emformer import Clusterer
from emformer.errors import CheckpointError, EmformerError
from emformer.models.clusterer import InputError, ParameterError, UnsupportedProblemError
from export_fixtures import REPO, subprocess_env


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
