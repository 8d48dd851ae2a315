"""The shipped pretrained clusterer (pretrained/emformer-gmm-small) on data nobody trained it on.

Five tables, every figure measured in the run that writes them:
  1. its learning curve per k against EM and the oracle (the val rows of its training run, curve.jsonl
     beside the export);
  2. the model's own share: per k, the model alone (its default passes, one k-means++ start, no restarts,
     no EM polish) against EM from the same start after T and after 10 iterations, paired per episode, and
     pass by pass against EM iteration by iteration;
  3. unknown k: accuracy and expected calibration error (ECE, 10 confidence bins) of the Clusterer's
     P(k | X) and of each of its two votes alone, against scikit-learn GaussianMixture + BIC over the same k range
     (P(k | X) ∝ exp(−BIC_k / 2)), on its own task and on make_blobs;
  4. EM polish and restarts: error and log-likelihood for em_steps m ∈ {0, 1, 3}, the shipped defaults, and
     the same restarts and EM steps without the model, against EM from k-means++ alone;
  5. adjusted Rand index and CPU time of the model (given k, and auto k; the shipped defaults beside the
     same restarts and EM steps without the model) against KMeans(n_init=10), GaussianMixture (full,
     spherical; given k and BIC over k), and our EM, on make_blobs sets of varied spread and anisotropy,
     Student-t and unequal-weight episodes, and two real data sets (PCA to the model's d). ▲ marks a model
     cell above every baseline of its row that knows as much about k (given k: KMeans, GMMs, EM, the
     restarts without the model; auto k: the BIC columns) by more than 0.01, ▼ one below the best of them
     by more than 0.01.

Times are CPU seconds per data set (time.process_time, one torch thread), which other processes on a
shared machine do not inflate.

    python benchmarks/bench_pretrained.py [--model emformer-gmm-small] [--quick] [--write BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import (REPO, fmt, load_average, machine_info, machine_markdown, markdown_table, progress,  # noqa: E402
                    write_report)

from emformer.models.calibration import (CALIBRATED_ECE_DRAWS, CALIBRATED_ECE_PERCENTILE,  # noqa: E402
                                          calibrated_ece_quantile, expected_calibration_error)

SEED = 5_000_011
SECTION_TITLE = "## The pretrained clusterer on data nobody trained it on"
EM_ITERS = 100
MARGIN = 0.01
FULL = {"episodes": 8, "task_episodes": 120, "share_episodes": 512, "k_episodes": 2048, "points": None}
QUICK = {"episodes": 2, "task_episodes": 4, "share_episodes": 8, "k_episodes": 8, "points": 96}
"""points: the ARI table's data sets cut to this many points (quick: a check of the script, not a figure).
k_episodes: on 512 episodes a perfectly calibrated P(k | X) shows a 10-bin ECE up to ~0.055 (its 95th
percentile, the table's "ECE if calibrated"), more than the 0.05 the export aims at; 4x the episodes halve it,
so the table can tell a calibrated P(k | X) from one 0.05 off"""
SHARE_SES = 2.0
"""the model's own share: a difference from EM beyond this many paired standard errors is a verdict"""
BLOBS_SEEDS = 10
"""make_blobs sets per number of centres in the unknown-k table"""
CURVE_EPISODES = 128
"""episodes of the pass-by-pass table (every len // CURVE_EPISODES-th of the share table's)"""


# ------------------------------------------------------------------------------------------ data sets
def blobs(count: int, seed: int, n: int, k: int, d: int, std: Any, anisotropic: bool = False) -> list:
    from sklearn.datasets import make_blobs

    out = []
    for i in range(count):
        X, y = make_blobs(n_samples=n, centers=k, n_features=d, cluster_std=std, random_state=seed + i)
        if anisotropic:
            rng = np.random.default_rng(seed + i)
            X = X @ rng.normal(size=(d, d))  # a random linear map: elongated, sheared clusters
        out.append((X, y, k))
    return out


def task_episodes(count: int, seed: int, **task: Any) -> list:
    from emformer.data.episodes import sample_episodes
    from emformer.data.tasks import TaskSpec

    batch = sample_episodes(TaskSpec(**task).validate(), seed, range(count))
    # k is the episode's: with unequal weights and small n a component may have no point
    return [(p[m].double().numpy(), l[m].numpy(), int(k))
            for p, l, m, k in zip(batch["points"], batch["labels"], batch["mask"], batch["k"])]


def own_task(info: dict[str, Any]) -> dict[str, Any]:
    """The model's training task as a user's data: raw episodes (not standardized, whatever the model was
    trained on: the Clusterer standardizes them itself); the init is the Clusterer's, so none is drawn."""
    from emformer.data.tasks import TaskSpec

    return {**TaskSpec(**info["task"]).to_dict(), "init": "noisy_truth", "standardize": False}


def real(name: str, d: int, classes: Optional[int] = None) -> list:
    from sklearn import datasets
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    data = getattr(datasets, f"load_{name}")()
    X, y = data.data, data.target
    if classes is not None:
        keep = y < classes
        X, y = X[keep], y[keep]
    X = PCA(n_components=d, random_state=0).fit_transform(StandardScaler().fit_transform(X))
    return [(X, y, len(np.unique(y)))]


def data_sets(episodes: int, d_model: int, points: Optional[int] = None) -> dict[str, list]:
    """name -> [(X, y, k)]; `points`: each set cut to that many of its points (a fixed random subset; k is
    still the set's)."""
    sets = {
        "blobs k=3 d=2 σ=1": blobs(episodes, 100, 300, 3, 2, 1.0),
        "blobs k=5 d=8 σ=2.5": blobs(episodes, 200, 400, 5, 8, 2.5),
        "blobs k=4 d=4 σ∈{0.5,1,2,3}": blobs(episodes, 300, 400, 4, 4, [0.5, 1.0, 2.0, 3.0]),
        "anisotropic blobs k=3 d=2": blobs(episodes, 400, 300, 3, 2, 1.0, anisotropic=True),
        "Student-t ν=3 k=4 d=8 Δ=4": task_episodes(episodes, 500, k=4, d=8, n=256, separation=4.0, noise="student_t",
                                                   noise_df=3.0),
        "unequal weights Dirichlet(1) k=4 d=8 Δ=4": task_episodes(episodes, 600, k=4, d=8, n=256, separation=4.0,
                                                               weights="dirichlet"),
        f"breast cancer (PCA {d_model}) k=2": real("breast_cancer", d_model),
        f"digits 0–7 (PCA {d_model}) k=8": real("digits", d_model, classes=8),
        f"digits (PCA {d_model}) k=10": real("digits", d_model),
    }
    if points is None:
        return sets
    rng = np.random.default_rng(0)
    cut = {}
    for name, items in sets.items():
        keeps = [np.sort(rng.permutation(len(X))[:points]) for X, _, _ in items]
        cut[name] = [(X[keep], y[keep], k) for (X, y, k), keep in zip(items, keeps)]
    return cut


# ------------------------------------------------------------------------------------------ methods
def gmm_bic(X: np.ndarray, ks: list[int], covariance: str, seed: int) -> tuple[np.ndarray, dict[int, float]]:
    """GaussianMixture for each k in ks; the labels of the lowest BIC and P(k) ∝ exp(−BIC/2)."""
    from sklearn.mixture import GaussianMixture

    fits = {k: GaussianMixture(k, covariance_type=covariance, random_state=seed).fit(X) for k in ks}
    bic = np.array([fits[k].bic(X) for k in ks])
    weights = np.exp(-(bic - bic.min()) / 2)
    proba = dict(zip(ks, (weights / weights.sum()).tolist()))
    return fits[ks[int(bic.argmin())]].predict(X), proba


def kmeanspp_start(X: np.ndarray, k: int, seed: int) -> np.ndarray:
    """One k-means++ start [k, d] in X's own coordinates (data.inits.kmeans_plus_plus, uniforms of `seed`)."""
    from emformer.data import inits

    uniforms = torch.as_tensor(np.random.default_rng(seed).random((1, k)))
    x = torch.as_tensor(X)[None]
    return inits.kmeans_plus_plus(x, torch.ones(1, len(X), dtype=torch.bool), torch.ones(1, k, dtype=torch.bool),
                                  uniforms)[0].numpy()


def em_from(X: np.ndarray, init: np.ndarray, iters: int) -> tuple[np.ndarray, float]:
    """baselines.em (spherical) for `iters` iterations from centroids `init`: (responsibilities [n, k],
    log-likelihood per point)."""
    from emformer.models import baselines

    x, k = torch.as_tensor(X)[None], len(init)
    fit = baselines.em(x, torch.ones(1, len(X), dtype=torch.bool), torch.ones(1, k, dtype=torch.bool),
                       torch.as_tensor(init)[None], iters)
    return fit.log_resp[0].exp().numpy(), float(fit.log_likelihood[0])


def restarts_em(X: np.ndarray, k: int, seed: int, n_init: int, em_steps: int) -> np.ndarray:
    """The shipped defaults' restarts without the model: `n_init` k-means++ starts, `em_steps` EM iterations
    from each (the model's passes plus its EM steps), the one of highest likelihood (responsibilities [n, k])."""
    fits = [em_from(X, kmeanspp_start(X, k, seed * 1_000 + r), em_steps) for r in range(n_init)]
    return max(fits, key=lambda fit: fit[1])[0]


def our_em(X: np.ndarray, k: int, seed: int) -> np.ndarray:
    """baselines.em (spherical) from k-means++ seeds, EM_ITERS iterations."""
    return em_from(X, kmeanspp_start(X, k, seed), EM_ITERS)[0].argmax(-1)


def methods(model: str, ks: list[int], k_max: int, info: dict[str, Any]
            ) -> dict[str, tuple[str, Callable[[np.ndarray, int, int], Any]]]:
    """name -> (what it knows about k: 'given' | 'auto' | 'model' | 'model-auto', fit(X, k, seed) -> labels);
    beside the shipped defaults' row, their restarts and EM steps without the model."""
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    from emformer import Clusterer

    def emformer(**params: Any) -> Callable[[np.ndarray, int, int], Any]:
        def fit(X: np.ndarray, k: int, seed: int) -> Any:
            if params.get("n_clusters") != "auto" and k > k_max:
                return None  # more clusters than the model's slots
            chosen = {"n_clusters": k, "n_init": 1, "em_steps": 0, **params}  # one pass unless asked
            return Clusterer.from_pretrained(model, random_state=seed, **chosen).fit_predict(X)
        return fit

    n_init, em_steps = shipped_defaults(info)
    iters = info["passes"] + em_steps
    return {
        "emformer": ("model", emformer()),
        f"emformer n_init={n_init} em_steps={em_steps}": ("model", emformer(n_init=n_init, em_steps=em_steps)),
        f"no model: {n_init} k-means++ + EM {iters} it.": (
            "given", lambda X, k, s: restarts_em(X, k, s, n_init, iters).argmax(-1)),
        "KMeans n_init=10": ("given", lambda X, k, s: KMeans(k, n_init=10, random_state=s).fit_predict(X)),
        "GMM full": ("given", lambda X, k, s: GaussianMixture(k, covariance_type="full", random_state=s).fit_predict(X)),
        "GMM spherical": ("given", lambda X, k, s: GaussianMixture(k, covariance_type="spherical", random_state=s).fit_predict(X)),
        f"our EM ({EM_ITERS} it.)": ("given", lambda X, k, s: our_em(X, k, s)),
        "emformer auto k": ("model-auto", emformer(n_clusters="auto")),
        f"emformer auto k n_init={n_init} em_steps={em_steps}": (
            "model-auto", emformer(n_clusters="auto", n_init=n_init, em_steps=em_steps)),
        "GMM full + BIC": ("auto", lambda X, k, s: gmm_bic(X, ks, "full", s)[0]),
        "GMM spherical + BIC": ("auto", lambda X, k, s: gmm_bic(X, ks, "spherical", s)[0]),
    }


# ------------------------------------------------------------------------------------------ figures
def main_table(model: str, episodes: int, info: dict[str, Any], points: Optional[int] = None
               ) -> tuple[dict[str, Any], str]:
    from sklearn.metrics import adjusted_rand_score

    ks = list(range(info["k_min"], info["k_max"] + 1))
    table = methods(model, ks, info["k_max"], info)
    sets = data_sets(episodes, info["d"], points)
    figures: dict[str, Any] = {}
    rows_ari, rows_time = [], []
    for name, items in sets.items():
        progress(f"pretrained: {name} ({len(items)} data set(s))")
        ari: dict[str, Optional[float]] = {}
        cpu: dict[str, Optional[float]] = {}
        for method, (_, fit) in table.items():
            scores, seconds = [], 0.0
            for index, (X, y, k) in enumerate(items):
                start = time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # out-of-range and sklearn convergence warnings
                    labels = fit(X, k, index)
                seconds += time.process_time() - start
                if labels is None:
                    break
                scores.append(adjusted_rand_score(y, labels))
            ari[method] = float(np.mean(scores)) if scores else None
            cpu[method] = seconds / len(items) if scores else None
        figures[name] = {"ari": ari, "cpu_s": cpu}
        rows_ari.append([name] + [_marked(method, ari, table) for method in table])
        rows_time.append([name] + [fmt(cpu[m], 2) if cpu[m] is not None else "n/a" for m in table])
    header = ["data set"] + list(table)
    text = ("Adjusted Rand index (mean over the data sets of each row; ▲ / ▼: the model above / below every "
            f"baseline that knows as much about k by more than {MARGIN}; n/a: k above the model's {info['k_max']} "
            "slots):\n\n" + markdown_table(header, rows_ari) +
            "\n\nCPU seconds per data set (one torch thread):\n\n" + markdown_table(header, rows_time))
    return figures, text


def _marked(method: str, ari: dict[str, Optional[float]], table: dict[str, Any]) -> str:
    value = ari[method]
    if value is None:
        return "n/a"
    kind = table[method][0]
    if not kind.startswith("model"):
        return fmt(value, 3)
    rivals = [ari[m] for m, (k, _) in table.items() if k == ("auto" if kind == "model-auto" else "given")
              and ari[m] is not None]
    mark = "▲" if value > max(rivals) + MARGIN else "▼" if value < max(rivals) - MARGIN else ""
    return f"{fmt(value, 3)} {mark}".strip()


def unknown_k_table(model: str, count: int, info: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """k-accuracy and ECE of P(k | X) on fresh episodes of the model's own task, against GMM + BIC."""
    from emformer import Clusterer

    items = task_episodes(count, SEED, **own_task(info))
    ks = list(range(info["k_min"], info["k_max"] + 1))
    # random_state: its tied EM draws k-means++ starts; fixed, as at export, so the table is reproducible
    clusterer = Clusterer.from_pretrained(model, random_state=0)
    results: dict[str, dict[str, list]] = {m: {"conf": [], "correct": [], "cpu": []} for m in K_METHODS}
    for index, (X, y, k) in enumerate(items):
        for method, (proba, cpu) in k_probas(clusterer, X, ks, index).items():
            results[method]["cpu"].append(cpu)
            best = max(proba, key=proba.get)
            results[method]["conf"].append(proba[best])
            results[method]["correct"].append(best == k)
    figures, rows = {}, []
    for method, r in results.items():
        conf, correct = np.array(r["conf"]), np.array(r["correct"], dtype=float)
        lo, hi = ece_interval(conf, correct)
        figures[method] = {"k_accuracy": float(correct.mean()), "ece": expected_calibration_error(conf, correct),
                           "ece_interval": [lo, hi], "ece_if_calibrated": calibrated_ece_quantile(conf),
                           "mean_confidence": float(conf.mean()), "cpu_s": float(np.mean(r["cpu"]))}
        f = figures[method]
        rows.append([method, f["k_accuracy"], f["mean_confidence"], f["ece"], f"[{lo:.3f}, {hi:.3f}]",
                     f["ece_if_calibrated"], fmt(f["cpu_s"], 2)])
    blobs_figures, blobs_text = blobs_k_accuracy(clusterer, ks, BLOBS_SEEDS if count >= 100 else 1)
    figures["make_blobs"] = blobs_figures
    text = (f"{count} fresh episodes of the model's own task (k ∈ [{info['k_min']}, {info['k_max']}], d ∈ "
            f"[{info['task'].get('d_min') or info['task']['d']}, {info['task']['d']}], n ∈ [{info['task']['n']}, "
            f"{info['task'].get('n_max') or info['task']['n']}], Δ ∈ [{info['task']['separation']}, "
            f"{info['task'].get('separation_max') or info['task']['separation']}]); BIC over the same k range:\n\n"
            + markdown_table(["method", "k accuracy", "mean confidence", "ECE",
                              f"ECE, {ECE_BOOTSTRAP_LEVEL:.0%} bootstrap interval",
                              f"ECE if calibrated, {CALIBRATED_ECE_PERCENTILE}th pct.", "CPU s / episode"], rows)
            + "\n\nThe emformer rows share one `k_evidence` per episode (count logits and the BIC of each k), so "
            f"their CPU column is that one cost. The interval resamples the episodes ({ECE_BOOTSTRAP_DRAWS} draws, "
            "percentiles): a 10-bin ECE on a few hundred episodes carries a few hundredths of sampling noise of its "
            f"own, hence this many episodes. \"ECE if calibrated\": the {CALIBRATED_ECE_PERCENTILE}th percentile of "
            "the ECE that a perfectly calibrated P(k | X) with the same confidences shows on these episodes (each pick "
            f"right with probability its confidence; `calibrated_ece_quantile`, {CALIBRATED_ECE_DRAWS} draws): an ECE "
            "below it is what sampling alone gives."
            + "\n\n" + blobs_text)
    return figures, text


ECE_BOOTSTRAP_DRAWS = 2000
ECE_BOOTSTRAP_LEVEL = 0.95


def ece_interval(confidence: np.ndarray, correct: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the ECE over episodes (ECE_BOOTSTRAP_DRAWS resamples)."""
    rng = np.random.default_rng(seed)
    draws = [expected_calibration_error(confidence[i], correct[i])
             for i in rng.integers(0, len(confidence), size=(ECE_BOOTSTRAP_DRAWS, len(confidence)))]
    tail = (1 - ECE_BOOTSTRAP_LEVEL) / 2 * 100
    return float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))


K_METHODS = ("emformer auto k: P(k | X)", "emformer count head alone", "emformer's BIC alone (tied spherical EM)",
             "GMM spherical + BIC", "GMM full + BIC")
"""the unknown-k rows: the Clusterer's calibrated P(k | X), each of its two votes alone (the count head's softmax;
the BIC of its tied spherical EM, P(k) ∝ exp(−BIC_k / 2)), and scikit-learn's mixtures with P(k) ∝ exp(−BIC_k / 2)"""


def k_probas(clusterer: Any, X: np.ndarray, ks: list[int], seed: int) -> dict[str, tuple[dict[int, float], float]]:
    """P(k | X) of every K_METHODS row with its CPU seconds. The emformer rows share one `k_evidence` (the count
    logits and the BIC of each k: what `predict_k_proba` computes), so each shows that one cost."""
    from emformer.models.calibration import k_log_posterior

    out: dict[str, tuple[dict[int, float], float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.process_time()
        kk, logits, bics = clusterer.k_evidence(X)
        cpu = time.process_time() - start
        votes = {K_METHODS[0]: k_log_posterior(logits, bics, torch.tensor(float(len(X))), clusterer.k_posterior),
                 K_METHODS[1]: torch.log_softmax(logits.double(), -1),
                 K_METHODS[2]: torch.log_softmax(-(bics.double() - bics.min()) / 2, -1)}
        for method, log_p in votes.items():
            out[method] = dict(zip(kk, log_p.exp().tolist())), cpu
        for method in K_METHODS[3:]:
            start = time.process_time()
            proba = gmm_bic(X, ks, "spherical" if "spherical" in method else "full", seed)[1]
            out[method] = proba, time.process_time() - start
    return out


def blobs_k_accuracy(clusterer: Any, ks: list[int], seeds: int) -> tuple[dict[str, Any], str]:
    """How often k is right on scikit-learn's make_blobs(300, centers=c, n_features=5), c = 2..6, `seeds` sets
    each, for every K_METHODS row (BIC over the model's k range)."""
    from sklearn.datasets import make_blobs

    right: dict[str, dict[int, int]] = {method: {} for method in K_METHODS}
    for c in range(2, 7):
        for method in right:
            right[method][c] = 0
        for seed in range(seeds):
            X, _ = make_blobs(300, centers=c, n_features=5, random_state=seed)
            for method, (proba, _) in k_probas(clusterer, X, ks, seed).items():
                right[method][c] += int(max(proba, key=proba.get) == c)
    rows = [[method] + [f"{counts[c]} / {seeds}" for c in counts] + [f"{sum(counts.values())} / {5 * seeds}"]
            for method, counts in right.items()]
    text = (f"k right on `make_blobs(300, centers=c, n_features=5, random_state=s)`, s = 0..{seeds - 1}:\n\n"
            + markdown_table(["method"] + [f"c={c}" for c in range(2, 7)] + ["all"], rows))
    return {method: {"right": counts, "sets": seeds} for method, counts in right.items()}, text


def polish_table(model: str, count: int, info: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """err and log-likelihood of the model with em_steps m, and of EM from k-means++ alone, on fresh task
    episodes (given k). The log-likelihood is the mean per point of the spherical mixture fitted to each
    final assignment, in the episode's own coordinates."""
    from emformer import Clusterer
    from emformer.models import baselines, metrics

    items = task_episodes(count, SEED + 1, **own_task(info))
    rows, figures = [], {}

    def score(X: np.ndarray, y: np.ndarray, proba: np.ndarray) -> tuple[float, float]:
        k = proba.shape[1]
        x, resp = torch.as_tensor(X)[None], torch.as_tensor(proba)[None]
        mask, kmask = torch.ones(1, len(X), dtype=torch.bool), torch.ones(1, k, dtype=torch.bool)
        fit = baselines.em_from_responsibilities(x, mask, kmask, resp, 0)
        err = metrics.misclustering_rate(resp.argmax(-1), torch.as_tensor(y)[None], mask, k)
        return float(err[0]), float(fit.log_likelihood[0])

    variants: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {}
    for m in (0, 1, 3):
        variants[f"emformer em_steps={m}"] = (lambda m: lambda X, k, s: Clusterer.from_pretrained(
            model, n_clusters=k, em_steps=m, n_init=1, random_state=s).fit(X).probabilities_)(m)
    n_init, em_steps = shipped_defaults(info)
    variants[f"emformer n_init={n_init} em_steps={em_steps}"] = lambda X, k, s: Clusterer.from_pretrained(
        model, n_clusters=k, em_steps=em_steps, n_init=n_init, random_state=s).fit(X).probabilities_

    iters = info["passes"] + em_steps
    variants[f"no model: {n_init} k-means++ starts + EM {iters} it., best likelihood"] = (
        lambda X, k, s: restarts_em(X, k, s, n_init, iters))
    for iters in (3, 10, EM_ITERS):
        variants[f"EM from k-means++, {iters} it."] = (lambda iters: lambda X, k, s: em_from(
            X, kmeanspp_start(X, k, s), iters)[0])(iters)
    for name, fit in variants.items():
        errs, lls, cpu = [], [], 0.0
        for index, (X, y, k) in enumerate(items):
            start = time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                proba = fit(X, k, index)
            cpu += time.process_time() - start
            err, ll = score(X, y, proba)
            errs.append(err)
            lls.append(ll)
        figures[name] = {"err": float(np.mean(errs)), "log_likelihood": float(np.mean(lls)), "cpu_s": cpu / len(items)}
        rows.append([name, figures[name]["err"], figures[name]["log_likelihood"], fmt(cpu / len(items), 2)])
    text = (f"{count} fresh episodes of the model's own task, k given; error = mis-clustering rate under the best "
            "relabelling; log-likelihood per point of the spherical mixture fitted to the final assignment:\n\n"
            + markdown_table(["method", "error", "log-likelihood / point", "CPU s / episode"], rows))
    return figures, text


def paired(diff: np.ndarray) -> tuple[float, float, str]:
    """(mean, standard error, verdict) of per-episode differences model − EM: LOSES / BEATS beyond
    SHARE_SES standard errors, else TIE."""
    mean = float(diff.mean())
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    verdict = "LOSES" if mean > SHARE_SES * se else "BEATS" if mean < -SHARE_SES * se else "TIE"
    return mean, se, verdict


def share_table(model: str, count: int, info: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The model's own share: per k, the model alone (its default passes, one k-means++ start given as init,
    no restarts, no EM polish) against EM from the same start after as many iterations as the model has
    passes and after 10, paired per episode; then, all k together, t = 1..T passes against t EM iterations."""
    from emformer import Clusterer
    from emformer.models import metrics

    passes, trained = info["passes"], info["trained_passes"]
    items = task_episodes(count, SEED + 2, **own_task(info))

    def err(X: np.ndarray, y: np.ndarray, pred: np.ndarray, k: int) -> float:
        mask = torch.ones(1, len(X), dtype=torch.bool)
        return float(metrics.misclustering_rate(torch.as_tensor(pred)[None], torch.as_tensor(y)[None], mask, k)[0])

    # past the trained and the default passes too: more passes should refine, not undo
    steps = sorted({1, 2, 3, trained, 2 * trained, passes, passes + passes // 2} | set(range(2, trained + 1, 2)))
    per: dict[str, list] = {"k": [], "model": [], "em_T": [], "em_10": []}
    by_t: dict[int, dict[str, list]] = {t: {"model": [], "em": []} for t in steps}
    curve_every = max(1, len(items) // CURVE_EPISODES)
    for index, (X, y, k) in enumerate(items):
        start = kmeanspp_start(X, k, index)

        def model_err(n_passes: int) -> float:
            pred = Clusterer.from_pretrained(model, n_clusters=k, init=start, n_init=1, em_steps=0,
                                             n_passes=n_passes).fit_predict(X)
            return err(X, y, pred, k)

        per["k"].append(k)
        per["model"].append(model_err(passes))
        per["em_T"].append(err(X, y, em_from(X, start, passes)[0].argmax(-1), k))
        per["em_10"].append(err(X, y, em_from(X, start, 10)[0].argmax(-1), k))
        if index % curve_every == 0:
            for t in steps:
                by_t[t]["model"].append(per["model"][-1] if t == passes else model_err(t))
                by_t[t]["em"].append(per["em_T"][-1] if t == passes else err(X, y, em_from(X, start, t)[0].argmax(-1), k))
        if index % 64 == 0:
            progress(f"pretrained: share {index}/{len(items)}")
    ks_all = np.array(per["k"])
    arrays = {key: np.array(value) for key, value in per.items() if key != "k"}
    figures: dict[str, Any] = {"passes": passes, "episodes": len(items), "per_k": {}, "by_passes": {}}
    rows = []
    for k in [*sorted(set(per["k"])), None]:
        rows_of = ks_all == k if k is not None else np.ones(len(ks_all), dtype=bool)
        figure = {key: float(value[rows_of].mean()) for key, value in arrays.items()}
        figure["episodes"] = int(rows_of.sum())
        for ref in ("em_T", "em_10"):
            figure[f"minus_{ref}"], figure[f"minus_{ref}_se"], figure[f"verdict_{ref}"] = paired(
                arrays["model"][rows_of] - arrays[ref][rows_of])
        figures["per_k"][str(k) if k is not None else "all"] = figure
        rows.append([f"k={k}" if k is not None else "all k", figure["episodes"], figure["model"], figure["em_T"],
                     figure["em_10"], f"{figure['minus_em_T']:+.4f} ± {figure['minus_em_T_se']:.4f}",
                     f"{figure['minus_em_10']:+.4f} ± {figure['minus_em_10_se']:.4f}", figure["verdict_em_10"]])
    curve_rows = []
    for t in steps:
        model_t, em_t = np.array(by_t[t]["model"]), np.array(by_t[t]["em"])
        mean, se, verdict = paired(model_t - em_t)
        figures["by_passes"][str(t)] = {"model": float(model_t.mean()), "em": float(em_t.mean()),
                                        "minus_em": mean, "minus_em_se": se, "verdict": verdict}
        curve_rows.append([t, float(model_t.mean()), float(em_t.mean()), f"{mean:+.4f} ± {se:.4f}", verdict])
    text = (f"{len(items)} fresh raw episodes of the model's own task; one k-means++ start per episode "
            "(`kmeans_plus_plus` on the raw points), given to the model as `init=` (`n_init=1, em_steps=0`, its "
            f"default {passes} passes) and to EM (`baselines.em`, spherical) — the same start for both. "
            "Mis-clustering rate; differences paired per episode ± one standard error; the verdict against "
            f"EM-10 is LOSES / BEATS beyond {SHARE_SES:g} standard errors, else TIE:\n\n"
            + markdown_table(["k", "episodes", f"model alone ({passes} passes)", f"EM, {passes} it.", "EM, 10 it.",
                              f"model − EM-{passes}", "model − EM-10", "vs EM-10"], rows)
            + f"\n\nPass by pass (all k, every {curve_every}th episode: {len(by_t[steps[0]]['model'])}): the model "
            f"after t passes (`n_passes=t`; it was trained for up to {trained}, and runs {passes} by default) against "
            "EM after t iterations from the same start:\n\n"
            + markdown_table(["t", "model, t passes", "EM, t it.", "model − EM", "verdict"], curve_rows))
    return figures, text


def curve_table(export_dir: Path, info: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Val rows of the training run (curve.jsonl beside the export): error per k against EM and the oracle."""
    path = export_dir / "curve.jsonl"
    if not path.is_file():
        return {}, f"(no {path.name} beside the export: no learning curve)"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ks = list(range(info["k_min"], info["k_max"] + 1))
    staged = any("run" in r for r in rows)  # a model trained in stages (trainer.init_from): each run's rows
    header = (["run", "step"] if staged else ["step"]) + [f"k={k}" for k in ks] + ["all k", "k accuracy"]
    body = [([r.get("run", "")] if staged else []) + [r["step"]] + [fmt(r.get(f"err_k{k}"), 3) for k in ks]
            + [fmt(r["err"], 3), fmt(r.get("k_acc"), 3)] for r in rows]
    last = rows[-1]
    lead = [""] if staged else []
    body.append(["EM, 10 it. (same k-means++ init)"] + lead + [fmt(last.get(f"err_em_k{k}"), 3) for k in ks]
                + [fmt(last.get("err_em"), 3), "—"])
    body.append(["oracle"] + lead + [fmt(last.get(f"err_oracle_k{k}"), 3) for k in ks]
                + [fmt(last.get("err_oracle"), 3), "—"])
    text = ("Mis-clustering rate on its fixed val set (fresh episodes of the training task) during training, per k, "
            "with the count head's k accuracy" + (" (a run in stages: each starts from the one above it, at its "
                                                 "step 0)" if staged else "") + ":\n\n" + markdown_table(header, body))
    return {"rows": rows}, text


def model_info(model: str) -> tuple[Path, dict[str, Any]]:
    from emformer.models.export_format import read_export_config
    from emformer.models.registry import resolve_model_dir

    export_dir = resolve_model_dir(model)
    config = read_export_config(export_dir)
    arch, task = config["architecture"], config["task"]
    return export_dir, {"k_min": int(arch.get("k_min", 2)), "k_max": int(arch["k_max"]), "d": int(arch["d_in"]),
                        "task": task, "trained_passes": int(arch.get("passes", 1)),
                        # what the Clusterer runs: the export's clusterer_defaults n_passes, else the trained passes
                        "passes": int(config.get("clusterer_defaults", {}).get("n_passes", arch.get("passes", 1))),
                        "defaults": config.get("clusterer_defaults", {})}


def shipped_defaults(info: dict[str, Any]) -> tuple[int, int]:
    """(n_init, em_steps) the export's clusterer_defaults set (the Clusterer's own 1 and 0 where unset)."""
    defaults = info["defaults"]
    return int(defaults.get("n_init", 1)), int(defaults.get("em_steps", 0))


def command(model: str = "emformer-gmm-small", quick: bool = False) -> str:
    return (f".venv/bin/python benchmarks/bench_pretrained.py --model {model}" + (" --quick" if quick else "")
            + " --write BENCHMARKS.md")


def run(model: str = "emformer-gmm-small", quick: bool = False, heading: bool = True) -> tuple[dict[str, Any], str]:
    """(figures, markdown); heading=False leaves out the section title and command (run_all writes them)."""
    torch.set_num_threads(1)
    sizes = QUICK if quick else FULL
    export_dir, info = model_info(model)
    figures: dict[str, Any] = {}
    machine = machine_info() if heading else None
    parts = []
    for key, title, work in (
            ("curve", "Learning curve per k", lambda: curve_table(export_dir, info)),
            ("share", "The model's own share: the model alone against EM from the same start, per k",
             lambda: share_table(model, sizes["share_episodes"], info)),
            ("unknown_k", "Unknown k: P(k | X) against GaussianMixture + BIC",
             lambda: unknown_k_table(model, sizes["k_episodes"], info)),
            ("polish", "EM polish (em_steps) and restarts (n_init)",
             lambda: polish_table(model, sizes["task_episodes"], info)),
            ("table", "Adjusted Rand index and time on data nobody trained it on",
             lambda: main_table(model, sizes["episodes"], info, sizes["points"]))):
        progress(f"pretrained: {title}")
        figures[key], text = work()
        parts += [f"### {title}", "", text, ""]
    if machine is not None:  # written alone (not by run_all, whose header names the machine): say where
        parts = [SECTION_TITLE, "", f"Command: `{command(model, quick)}`, on this machine (the file's header is "
                 "run_all's, which did not write this section):", "", machine_markdown(machine, load_average()), "",
                 *parts]
    return figures, "\n".join(parts)


def replace_section(path: Path, title: str, text: str) -> None:
    """Put `text` (starting with the `## title` line) in place of that section of the markdown file, or at
    its end; the rest of the file is kept. The section ends at the next `## ` heading or at the begin marker
    of a hand-measured block (`<!-- NAME:begin -->`, benchmarks/common.py), which stays."""
    old = path.read_text() if path.is_file() else ""
    start = old.find(title)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        ends = [m.start() for m in re.finditer(r"\n(## |<!-- [\w-]+:begin -->)", old[start + len(title):])]
        end = start + len(title) + ends[0] if ends else -1
        new = old[:start] + text.rstrip("\n") + "\n" + (old[end:] if end >= 0 else "")
    write_report(path, new)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="emformer-gmm-small", help="shipped model name or export directory")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script only")
    parser.add_argument("--write", type=Path, default=None, help="replace this section of a markdown file (BENCHMARKS.md)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = parser.parse_args(argv)
    figures, text = run(args.model, args.quick)
    print(text)
    if args.write:
        replace_section(args.write if args.write.is_absolute() else REPO / args.write, SECTION_TITLE, text)
    if args.json:
        from common import save_json

        save_json(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
