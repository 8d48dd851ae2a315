"""The count head's calibration: ECE, and the temperature that fits held-out episodes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from emformer.models.calibration import bic, count_figures, expected_calibration_error, fit_k_posterior, k_log_posterior


def test_expected_calibration_error_is_the_binned_gap_between_accuracy_and_confidence():
    assert expected_calibration_error(np.array([0.9] * 10), np.array([1] * 9 + [0], dtype=float)) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([0.9] * 10), np.zeros(10)) == pytest.approx(0.9)
    assert expected_calibration_error(np.array([0.55, 0.95]), np.array([1.0, 1.0])) == pytest.approx(0.5 * 0.45 + 0.5 * 0.05)


@pytest.mark.parametrize("true_temperature", [0.5, 3.0])
def test_the_fitted_temperature_undoes_over_and_under_confidence(true_temperature):
    generator = torch.Generator().manual_seed(0)
    calibrated = torch.randn(4000, 7, generator=generator, dtype=torch.float64) * 1.5
    target = torch.multinomial(torch.softmax(calibrated, -1), 1, generator=generator)[:, 0]
    logits = calibrated * true_temperature  # what a head that is off by this temperature would output
    temperature, weight = fit_k_posterior(logits, target)  # no BIC: the temperature alone
    assert weight == 0.0
    assert temperature == pytest.approx(true_temperature, rel=0.1)
    before, after = count_figures(logits, target), count_figures(logits, target, temperature)
    assert after["k_accuracy"] == before["k_accuracy"]  # the argmax does not move
    assert after["ece"] < 0.03 < before["ece"] and after["nll"] < before["nll"]


def test_fit_k_posterior_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"logits \[E, K\] \(and BICs \[E, K\]\) and targets \[E\]"):
        fit_k_posterior(torch.zeros(5, 3), torch.zeros(4, dtype=torch.long))


def test_the_bic_weight_is_fitted_where_the_data_speak_and_the_count_head_does_not():
    """Targets follow the BIC's evidence while the count logits are noise: the fit gives the BIC its weight
    and the posterior is right where the logits alone are at chance."""
    generator = torch.Generator().manual_seed(1)
    target = torch.randint(0, 5, (600,), generator=generator)
    logits = torch.randn(600, 5, generator=generator, dtype=torch.float64)
    gaps = torch.rand(600, 5, generator=generator, dtype=torch.float64) * 20 + 5
    bics = gaps.scatter(1, target[:, None], 0.0)  # the right k has the lowest BIC, by 5 to 25
    temperature, weight = fit_k_posterior(logits, target, bics)
    assert weight > 0.2
    figures = count_figures(logits, target, temperature, bics, weight)
    assert figures["k_accuracy"] == 1.0 and count_figures(logits, target)["k_accuracy"] < 0.35
    torch.testing.assert_close(k_log_posterior(logits, bics, 2.0, 0.0), torch.log_softmax(logits / 2, -1))


def test_bic_counts_the_spherical_mixtures_parameters():
    # k d means, k variances and k - 1 weights: 2·3 + 2 + 1 = 9 parameters for k = 2 in 3-d
    value = bic(torch.tensor([[-1.5]]), torch.tensor([100.0]), torch.tensor([3.0]), torch.tensor([2]))
    assert float(value) == pytest.approx(-2 * 100 * -1.5 + 9 * np.log(100))
