"""train/export/card.py: the model card rendered from its jinja2 template, byte for byte the card that
`emformer export` wrote before the template (golden files made by the former markdown builder, as of main's
test-set card: figures on eval.test_seed, Model − EM with its paired standard error; and the pretrained
model's d range, per-d input scale, raw k-means++ seeds and count head)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from emformer.train.export.card import model_card

GOLDEN = Path(__file__).parent / "golden"

CONFIG = {
    "task": {"k": 3, "k_max": 5, "d": 4, "d_max": 8, "n": 32, "n_max": 64, "separation": 3.0, "separation_max": None,
             "sigma": 1.0, "weights": "uniform", "noise": "gaussian", "init": "noisy_truth", "init_noise": 0.5},
    "architecture": {"depth": 2, "heads": 2, "width": 64, "d_in": 8, "k_max": 5},
    "supported": {"k": {"max": 5}, "d": {"max": 8}, "n": {"max": None}},
    "parameters": 123456, "input_scale": 1.23456,
    "training": {"run_name": "debug-abc", "step": 200, "checkpoint_format": "deepspeed", "zero_stage": 2,
                 "commit": "0123abc", "run_config": {"eval": {"episodes": 256, "em_iters": 10}}},
    "eval": {"split": "test", "seed": 1000003, "episodes": 256, "step": 200, "err": 0.07, "err_em": 0.08,
             "err_minus_em_se": 0.004, "err_oracle": 0.064, "err_anchored": 0.1, "loss": 0.3, "ari": 0.8,
             "err_lloyd": 0.0005},
    "onnx": {"opset": 18, "inputs": ["points [B,n,d_in] float32", "mask [B,n] bool"],
             "outputs": ["logits [B,n,k_max] float32 (padded clusters -inf)"], "checked_sizes": [[1, 17], [3, 64]],
             "max_abs_diff": 1.234e-6},
}


def _without_eval_and_onnx() -> dict:
    config = copy.deepcopy(CONFIG)
    config["eval"] = None
    del config["onnx"]
    config["training"].update(run_name=None, zero_stage=None, commit=None, checkpoint_format="lightning")
    config["task"].update(init="kmeans++", d_max=None)
    return config


@pytest.mark.parametrize("name, config", [("full", CONFIG), ("bare", _without_eval_and_onnx())])
def test_card_matches_the_golden_file(name, config):
    assert model_card(config, "exports/it's") == (GOLDEN / f"model_card_{name}.md").read_text()


def test_card_of_an_iterating_model_with_a_calibrated_count_head():
    config = copy.deepcopy(CONFIG)
    config["architecture"].update(passes=8, passes_min=1, count_head=True)
    figures = {"k_accuracy": 0.8125, "mean_confidence": 0.79, "ece": 0.031, "nll": 0.5}
    config["count_head"] = {"temperature": 1.7, "bic_weight": 0.42, "bic_pool": 2.5, "bic_floor": 0.5,
                            "bic_floor_per_log_n": 1.0,
                            "fitted_on": {"seed": 1000000000, "episodes": 512},
                            "test": {"seed": 1000000001, "episodes": 512, **figures},
                            "test_count_head_alone": {**figures, "k_accuracy": 0.6, "ece": 0.2}}
    card = model_card(config, "exports/it")
    assert "It runs 8 passes by default" in card and "trained with 1 to 8 passes a batch" in card
    assert "past them" not in card and "started from" not in card
    config["training"]["run_config"].setdefault("trainer", {})["init_from"] = "runs/stage-1"
    assert "| started from (trainer.init_from) | runs/stage-1 |\n" in model_card(config, "exports/it")
    past = model_card({**config, "clusterer_defaults": {"n_passes": 16}}, "exports/it")
    assert "It runs 16 passes by default" in past and "trained with 1 to 8 passes a batch; its clusterer_defaults" in past
    assert "T = 1.7" in card and "λ = 0.42" in card and "β = 2.5" in card
    assert "k accuracy 0.8125" in card and "ECE 0.2" in card
    # ε(n) = sigmoid(0.5 + log(n / 256)): 0.5 + log(1/8) = -1.58 at n = 32, 0.5 at 256, 0.5 + log 4 at 1024
    assert "a = 0.5, b = 1" in card and "ε(32) = 0.17, ε(256) = 0.62, ε(1024) = 0.87" in card
    assert "perfectly calibrated" not in card  # an export from before the figure was recorded
    config["count_head"]["test"]["ece_if_calibrated"] = 0.0547
    config["count_head"]["test_count_head_alone"]["ece_if_calibrated"] = 0.0624
    card = model_card(config, "exports/it")
    assert ("error (10 bins) 0.0310 (a perfectly calibrated P(k | X) with the same confidences shows up to 0.0547 on "
            "as many episodes: its 95th percentile)") in card and "ECE 0.2000 (calibrated: up to 0.0624)" in card
    del config["count_head"]["bic_pool"]  # no BIC in the pool: the temperature-scaled count head alone
    card = model_card(config, "exports/it")
    assert "P(k | X) = softmax(logit_k / T)" in card and "ε(n)" not in card
