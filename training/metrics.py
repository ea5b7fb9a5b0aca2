"""Classification and calibration metrics on numpy arrays, torch-free.

The one implementation behind the report, ``convtune evaluate``, the linear probe's
history and the choice between the probe's and the fine-tuned model. Validation during
training logs torchmetrics' accuracy and macro-F1 (``training.module``), which
``tests/test_metrics.py`` holds to these definitions.

The expected calibration error (ECE) measures whether the probabilities mean what they
say: bin the predictions by confidence into ``ECE_BINS`` equal-width bins, and average
|accuracy - mean confidence| over the bins, weighted by their size.

Functions taking ``logits`` take one view's ``(N, C)`` or V views' ``(V, N, C)``
(``models.inference.view_probabilities``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from convtune.models.inference import view_probabilities

ECE_BINS = 15


def accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """The fraction of ``predicted`` equal to ``labels`` (0 for no images)."""
    return float(np.mean(labels == predicted)) if len(labels) else 0.0


def classification_metrics(
    labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class scores and the confusion matrix.

    ``confusion_matrix[i][j]`` counts images of class i predicted as class j. A class with
    no predictions has precision 0 (and no support gives recall 0), as in scikit-learn's
    ``zero_division=0``.

    Macro-F1 is the mean F1 over the classes that occur among the labels or the
    predictions. A class with neither has no F1 and is left out, so a perfect answer scores
    1 whatever classes the images hold; a class predicted but absent from the labels scores
    0. This is torchmetrics' ``MulticlassF1Score(average="macro")`` and scikit-learn's
    ``f1_score(average="macro")`` without ``labels``.
    """
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    true_positive = np.diag(confusion).astype(np.float64)
    predicted_count = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    precision = np.divide(
        true_positive, predicted_count, out=np.zeros(k), where=predicted_count > 0
    )
    recall = np.divide(true_positive, support, out=np.zeros(k), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(k), where=denominator > 0)
    occurring = (support + predicted_count) > 0
    return {
        "n": len(labels),
        "accuracy": accuracy(labels, predicted),
        "macro_f1": float(f1[occurring].mean()) if occurring.any() else 0.0,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion.tolist(),
    }


def binary_metrics(
    labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...], negative: list[str]
) -> dict[str, Any]:
    """A two-class view: the ``negative`` classes against all the others (positive)."""
    unknown = sorted(set(negative) - set(classes))
    if unknown:
        raise ValueError(f"binary view: unknown class(es) {unknown}; classes are {classes}")
    negative_ids = [classes.index(name) for name in negative]
    truth = (~np.isin(labels, negative_ids)).astype(np.int64)
    guess = (~np.isin(predicted, negative_ids)).astype(np.int64)
    view = classification_metrics(truth, guess, ("negative", "positive"))
    return {
        "negative_classes": list(negative),
        "positive_classes": [c for c in classes if c not in negative],
        "accuracy": view["accuracy"],
        "macro_f1": view["macro_f1"],
        **{f"positive_{k}": v for k, v in view["per_class"]["positive"].items()},
        "confusion_matrix": view["confusion_matrix"],
    }


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def reliability_bins(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """Per confidence bin: its range, count, accuracy and mean confidence."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Right-closed bins (lo, hi], with 0 confidence in the first: the usual convention.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    table = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        table.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": count,
                "accuracy": float(correct[members].mean()) if count else 0.0,
                "confidence": float(confidence[members].mean()) if count else 0.0,
            }
        )
    return table


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    table = reliability_bins(probabilities, labels, bins)
    total = sum(row["count"] for row in table)
    return float(
        sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in table) / total
    )


def calibration_summary(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """ECE and NLL before (T = 1) and after temperature scaling."""
    before, after = view_probabilities(logits, 1.0), view_probabilities(logits, temperature)
    return {
        "temperature": temperature,
        "ece": expected_calibration_error(after, labels),
        "nll": negative_log_likelihood(after, labels),
        "uncalibrated": {
            "ece": expected_calibration_error(before, labels),
            "nll": negative_log_likelihood(before, labels),
        },
    }
