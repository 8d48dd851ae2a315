"""The count head's calibration: ECE, and the temperature that fits held-out episodes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from emformer.models.calibration import count_figures, expected_calibration_error, fit_temperature


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
    temperature = fit_temperature(logits, target)
    assert temperature == pytest.approx(true_temperature, rel=0.1)
    before, after = count_figures(logits, target), count_figures(logits, target, temperature)
    assert after["k_accuracy"] == before["k_accuracy"]  # the argmax does not move
    assert after["ece"] < 0.03 < before["ece"] and after["nll"] < before["nll"]


def test_fit_temperature_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"logits \[E, K\] and targets \[E\]"):
        fit_temperature(torch.zeros(5, 3), torch.zeros(4, dtype=torch.long))
