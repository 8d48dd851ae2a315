"""The count head's calibration: ECE, and the temperature that fits held-out episodes."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from emformer.models.calibration import (KPosterior, bic, calibrated_ece_quantile, count_figures,
                                         expected_calibration_error, fit_k_posterior, k_log_posterior)


def test_expected_calibration_error_is_the_binned_gap_between_accuracy_and_confidence():
    assert expected_calibration_error(np.array([0.9] * 10), np.array([1] * 9 + [0], dtype=float)) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([0.9] * 10), np.zeros(10)) == pytest.approx(0.9)
    assert expected_calibration_error(np.array([0.55, 0.95]), np.array([1.0, 1.0])) == pytest.approx(0.5 * 0.45 + 0.5 * 0.05)


def test_the_calibrated_ece_quantile_is_the_ece_that_sampling_alone_gives():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.3, 1.0, 512)
    band = calibrated_ece_quantile(confidence, draws=400, seed=2)
    # the same draws through expected_calibration_error, one at a time
    correct = np.random.default_rng(2).random((400, 512)) < confidence
    slow = [expected_calibration_error(confidence, c) for c in correct]
    assert band == pytest.approx(float(np.quantile(slow, 0.95)), abs=1e-12)
    # a calibrated predictor's ECE on fresh cases stays below it about 95% of the time; one 0.15 over-confident
    # does not, and more cases narrow it
    fresh = [expected_calibration_error(confidence, rng.random(512) < confidence) for _ in range(400)]
    assert 0.9 < np.mean(np.array(fresh) <= band) < 0.99
    assert expected_calibration_error(confidence, rng.random(512) < confidence - 0.15) > band
    assert calibrated_ece_quantile(rng.uniform(0.3, 1.0, 4096), draws=400) < band / 2
    with pytest.raises(ValueError, match="calibrated_ece_quantile: confidences \\[N\\]"):
        calibrated_ece_quantile(np.zeros((2, 2)))


@pytest.mark.parametrize("true_temperature", [0.5, 3.0])
def test_the_fitted_temperature_undoes_over_and_under_confidence(true_temperature):
    generator = torch.Generator().manual_seed(0)
    calibrated = torch.randn(4000, 7, generator=generator, dtype=torch.float64) * 1.5
    target = torch.multinomial(torch.softmax(calibrated, -1), 1, generator=generator)[:, 0]
    logits = calibrated * true_temperature  # what a head that is off by this temperature would output
    posterior = fit_k_posterior(logits, target)  # no BIC: the temperature alone
    assert not posterior.uses_bic
    assert posterior.temperature == pytest.approx(true_temperature, rel=0.1)
    before, after = count_figures(logits, target), count_figures(logits, target, posterior)
    assert after["k_accuracy"] == before["k_accuracy"]  # the argmax does not move
    assert after["ece"] < 0.03 < before["ece"] and after["nll"] < before["nll"]
    # the calibrated reference: the miscalibrated head's ECE is far above it, the fitted one's about at it
    confidence = torch.softmax(calibrated, -1).max(-1).values.numpy()
    assert after["ece_if_calibrated"] == pytest.approx(calibrated_ece_quantile(confidence), rel=0.2)
    assert before["ece"] > 2 * before["ece_if_calibrated"] and after["ece"] < 2 * after["ece_if_calibrated"]


def test_fit_k_posterior_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"logits \[E, K\] \(and BICs \[E, K\] with n \[E\]\) and targets \[E\]"):
        fit_k_posterior(torch.zeros(5, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="with n"):  # BICs without the point counts their share depends on
        fit_k_posterior(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long), torch.zeros(5, 3))


def test_the_bic_decides_where_it_is_right_and_a_wrong_bic_costs_a_bounded_price():
    """On many points the targets follow the BIC; on few the BIC is confidently wrong and the count head is
    right. The fitted pool floors the BIC's vote on few points and keeps it sharp on many, right on both; a
    posterior that scaled the BIC into the head's logits could not be both (one weight for all n)."""
    generator = torch.Generator().manual_seed(1)
    E, K = 800, 5
    target = torch.randint(0, K, (E,), generator=generator)
    n = torch.where(torch.arange(E) % 2 == 0, 1000.0, 40.0).double()
    many = n > 100
    noise = torch.randn(E, K, generator=generator, dtype=torch.float64)
    # the head: noise on many points, a clear vote for the target on few
    logits = torch.where(many[:, None], noise, noise + 4.0 * torch.nn.functional.one_hot(target, K))
    gaps = torch.rand(E, K, generator=generator, dtype=torch.float64) * 200 + 50
    wrong = (target + 1) % K
    bics = torch.where(many[:, None], gaps.scatter(1, target[:, None], 0.0), gaps.scatter(1, wrong[:, None], 0.0))
    posterior = fit_k_posterior(logits, target, bics, n)
    assert posterior.uses_bic and posterior.bic_floor_per_log_n < 0
    assert float(posterior.floor(torch.tensor(1000.0))) < 0.1 < 0.9 < float(posterior.floor(torch.tensor(40.0)))
    figures = count_figures(logits, target, posterior, bics, n)
    assert figures["k_accuracy"] > 0.95 and figures["ece"] < 0.05
    assert count_figures(logits, target)["k_accuracy"] < 0.65  # the head alone: at chance on many points
    # no BIC in the pool: the temperature-scaled head, whatever the BIC says
    torch.testing.assert_close(k_log_posterior(logits, bics, n, KPosterior(2.0)), torch.log_softmax(logits / 2, -1))
    # an impossible k (logit -inf, BIC +inf) gets no probability from either vote
    logits[0, -1], bics[0, -1] = -math.inf, math.inf
    log_p = k_log_posterior(logits[:1], bics[:1], n[:1], posterior)
    assert float(log_p[0, -1].exp()) == 0.0 and float(log_p.exp().sum()) == pytest.approx(1.0)
    # β = 0: the BIC weighs nothing, the head decides alone, and the impossible k stays impossible (not nan)
    zero = k_log_posterior(logits[:1], bics[:1], n[:1], dataclasses.replace(posterior, bic_pool=0.0))
    torch.testing.assert_close(zero, k_log_posterior(logits[:1], None, None, KPosterior(posterior.temperature)))


def test_where_the_votes_agree_the_pool_is_surer_than_either_and_a_floored_bic_cannot_overrule_a_sure_head():
    head = torch.log(torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64))
    bics = torch.tensor([[0.0, 4.0, 8.0]], dtype=torch.float64)  # the BIC's vote, λ = 1: 0.84, 0.11, 0.02
    n = torch.tensor([256.0], dtype=torch.float64)
    posterior = KPosterior(1.0, 1.0, 1.0, bic_floor=-20.0)  # floor ~0: the product of the two votes
    p = k_log_posterior(head, bics, n, posterior).exp()[0]
    vote = torch.softmax(-bics[0] / 2, -1)
    torch.testing.assert_close(p, torch.softmax(head[0], -1) * vote / (torch.softmax(head[0], -1) * vote).sum())
    assert float(p[0]) > max(0.6, float(vote[0]))
    # a BIC sure of k = 3 (gap 1000) against a head sure of k = 1: with a floor of 1/2 it moves the head's
    # log-odds by at most log((1/2 + 1/6) / (1/6)) = log 4
    sure_head = torch.tensor([[6.0, 0.0, 0.0]], dtype=torch.float64)
    wrong_bics = torch.tensor([[1000.0, 1000.0, 0.0]], dtype=torch.float64)
    p = k_log_posterior(sure_head, wrong_bics, n, KPosterior(1.0, 1.0, 1.0, bic_floor=0.0)).exp()[0]
    assert float(p[0]) > 0.9 and float(torch.log(p[2] / p[1])) == pytest.approx(math.log(4), rel=1e-6)


def test_bic_counts_the_tied_spherical_mixtures_parameters():
    # tied spherical: k d means, one variance and k - 1 weights: 2·3 + 1 + 1 = 8 parameters for k = 2 in 3-d
    value = bic(torch.tensor([[-1.5]]), torch.tensor([100.0]), torch.tensor([3.0]), torch.tensor([2]))
    assert float(value) == pytest.approx(-2 * 100 * -1.5 + 8 * np.log(100))
