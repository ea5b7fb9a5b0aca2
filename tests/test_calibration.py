"""Temperature scaling, ECE and NLL against worked examples."""

from __future__ import annotations

import numpy as np
import pytest

from convtune.models.inference import softmax, view_probabilities
from convtune.training.calibration import fit_temperature, fit_temperatures
from convtune.training.metrics import (
    calibration_summary,
    expected_calibration_error,
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


def views_of_known_temperature(
    temperature: float, *, views: int = 8, n: int = 4000, seed: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """``(views, n, 4)`` logits, each view the image's logits plus its own noise, and
    labels drawn from the mean over the views of ``softmax(logits_v / temperature)``."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(0, 3, (n, 4))
    logits = shared + rng.normal(0, 1.5, (views, n, 4))
    mean = view_probabilities(logits, temperature)
    labels = np.array([rng.choice(4, p=row / row.sum()) for row in mean])
    return logits, labels


def test_temperature_for_views_recovers_the_one_the_labels_were_drawn_with() -> None:
    logits, labels = views_of_known_temperature(2.5)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.06)
    # Fitted for one view alone, the temperature is another: the mean softens on its own.
    assert abs(fit_temperature(logits[0], labels) - 2.5) > 0.5


def test_one_view_in_a_views_axis_is_plain_temperature_scaling() -> None:
    logits, labels = overconfident_logits()
    assert fit_temperature(logits[np.newaxis], labels) == pytest.approx(
        fit_temperature(logits, labels), rel=1e-6
    )
    summary = calibration_summary(logits[np.newaxis], labels, 2.0)
    assert summary == calibration_summary(logits, labels, 2.0)


def test_fit_temperatures_gives_the_single_view_and_the_view_set() -> None:
    logits, labels = views_of_known_temperature(2.5, n=1500)
    temperatures = fit_temperatures(logits, labels, views="d4")
    assert set(temperatures) == {"none", "d4"}
    assert temperatures["none"] == fit_temperature(logits[0], labels)
    assert temperatures["d4"] == fit_temperature(logits, labels)
    assert fit_temperatures(logits[:1], labels, views="none") == {"none": temperatures["none"]}
