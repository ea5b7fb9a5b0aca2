"""Temperature scaling, ECE and NLL against worked examples."""

from __future__ import annotations

import numpy as np
import pytest

from models.inference import softmax
from training.calibration import (
    calibration_summary,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
)


def test_ece_against_a_hand_worked_example() -> None:
    # Four predictions of class 0. Confidences 0.97 and 0.95 fall in bin (14/15, 1],
    # 0.58 and 0.55 in bin (8/15, 9/15]. Top bin: 1 of 2 right, mean confidence 0.96,
    # gap 0.46; the other: 2 of 2 right, mean confidence 0.565, gap 0.435.
    # ECE = (2 * 0.46 + 2 * 0.435) / 4 = 0.4475.
    probabilities = np.array([[0.97, 0.03], [0.95, 0.05], [0.58, 0.42], [0.55, 0.45]])
    labels = np.array([0, 1, 0, 0])
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.4475)
    bins = reliability_bins(probabilities, labels)
    assert [b["count"] for b in bins if b["count"]] == [2, 2]
    assert sum(b["count"] for b in bins) == 4


def test_a_perfectly_calibrated_model_has_zero_ece() -> None:
    probabilities = np.array([[0.75, 0.25]] * 4)
    labels = np.array([0, 0, 0, 1])  # 75 % right at 75 % confidence
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.0)
    assert negative_log_likelihood(probabilities, labels) == pytest.approx(
        -(3 * np.log(0.75) + np.log(0.25)) / 4
    )


def overconfident_logits(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 3-class model that is right 70 % of the time but says so with ~99 % confidence."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    predicted = np.where(rng.random(n) < 0.7, labels, (labels + rng.integers(1, 3, n)) % 3)
    logits = rng.normal(0, 0.5, (n, 3))
    logits[np.arange(n), predicted] += 6.0
    return logits, labels


def test_temperature_scaling_lowers_nll_and_ece_of_an_overconfident_model() -> None:
    logits, labels = overconfident_logits()
    temperature = fit_temperature(logits, labels)
    assert temperature > 1.5  # over-confident: the fit softens the softmax
    summary = calibration_summary(logits, labels, temperature)
    assert summary["nll"] < summary["uncalibrated"]["nll"] * 0.7
    assert summary["ece"] < 0.05 < summary["uncalibrated"]["ece"]
    # Scaling never changes the predicted class.
    assert np.array_equal(softmax(logits, temperature).argmax(1), logits.argmax(1))
    # And it generalises: fitted on one sample, it helps on a fresh one.
    fresh_logits, fresh_labels = overconfident_logits(seed=1)
    fresh = calibration_summary(fresh_logits, fresh_labels, temperature)
    assert fresh["nll"] < fresh["uncalibrated"]["nll"]


def test_temperature_of_a_calibrated_model_stays_near_one() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, (4000, 4))
    labels = np.array([rng.choice(4, p=row) for row in softmax(logits)])
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)
