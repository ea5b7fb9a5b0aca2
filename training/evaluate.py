"""Evaluate an artifact on labelled images: accuracy, macro-F1, per-class scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track

from data.images import decode_rgb
from data.sources import DatasetError, LabelledImages
from models.inference import OnnxClassifier


def classification_metrics(
    labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]
) -> dict[str, Any]:
    """Accuracy, macro-F1 over all ``classes``, per-class scores and the confusion matrix.

    ``confusion_matrix[i][j]`` counts images of class i predicted as class j. A class with
    no predictions has precision 0 (and no support gives recall 0), as in scikit-learn's
    ``zero_division=0``.
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
    return {
        "n": len(labels),
        "accuracy": float(true_positive.sum() / max(1, len(labels))),
        "macro_f1": float(f1.mean()),
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


def evaluate_artifact(
    artifact_dir: Path, images: LabelledImages, *, batch_size: int = 32
) -> dict[str, Any]:
    """Classify ``images`` with the artifact and score against their labels by class name."""
    classifier = OnnxClassifier(artifact_dir)
    index = {name: i for i, name in enumerate(classifier.classes)}
    unknown = sorted(set(images.classes) - set(index))
    if unknown:
        raise DatasetError(
            f"the data has class(es) {unknown} that the model does not know "
            f"(model classes: {list(classifier.classes)})"
        )
    labels = np.array([index[images.classes[label]] for label in images.labels])
    predicted = []
    starts = range(0, len(images), batch_size)
    for start in track(starts, description="Evaluating", transient=True):
        batch = [decode_rgb(path) for path in images.paths[start : start + batch_size]]
        predicted.append(classifier.classify(batch).argmax(axis=1))
    return classification_metrics(labels, np.concatenate(predicted), classifier.classes)
