"""Classify image files with an exported artifact: the answers ``convtune predict`` prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convtune.models.inference import OnnxClassifier, format_prediction


def predict_images(
    artifact_dir: Path, images: list[Path], *, top_k: int, tta: str = "none"
) -> list[dict[str, Any]]:
    """One answer per image, in order: its path, top-1 label, every class's probability
    and the ``top_k`` classes; probabilities averaged over the ``tta`` views."""
    if top_k < 1:
        raise ValueError("--top-k must be a positive integer")
    classifier = OnnxClassifier(artifact_dir, tta=tta)
    probabilities = classifier.classify([classifier.decode(path) for path in images])
    return [
        {"image": str(path), **format_prediction(row, classifier.classes, top_k)}
        for path, row in zip(images, probabilities, strict=True)
    ]
