"""Evaluate an artifact on labelled images: accuracy, macro-F1, per-class scores."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track

from convtune.data.datasets import DatasetError, LabelFileFormat, LabelledImages
from convtune.data.layouts import open_dataset
from convtune.data.splits import load_split
from convtune.models.artifact import SPLIT_FILE
from convtune.models.inference import OnnxClassifier, view_probabilities
from convtune.training.config import FitConfig, load_saved_config
from convtune.training.history import read_history
from convtune.training.metrics import binary_metrics, calibration_summary, classification_metrics

_TTA_KEYS = ("accuracy", "macro_f1", "nll", "ece", "temperature")


def evaluation_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    classes: tuple[str, ...],
    *,
    temperature: float,
    binary_negative: list[str] | None = None,
) -> dict[str, Any]:
    """Everything the report shows: classification, calibration and the binary view.

    ``logits``: one view's ``(N, C)`` or V views' ``(V, N, C)``, whose mean calibrated
    probability decides the predicted class.
    """
    predicted = view_probabilities(logits, temperature).argmax(axis=1)
    metrics = {
        **classification_metrics(labels, predicted, classes),
        **calibration_summary(logits, labels, temperature),
    }
    if binary_negative:
        metrics["binary"] = binary_metrics(labels, predicted, classes, binary_negative)
    return metrics


def evaluation_metrics_with_views(
    logits: np.ndarray,
    labels: np.ndarray,
    classes: tuple[str, ...],
    *,
    views: str,
    temperatures: dict[str, float],
    binary_negative: list[str] | None = None,
) -> dict[str, Any]:
    """``evaluation_metrics`` of the single view (the first of the ``(V, N, C)`` logits of
    the ``views`` set) and, unless ``views`` is ``none``, a ``tta`` entry with the headline
    figures of the mean over the views, at their own temperature."""
    metrics = evaluation_metrics(
        logits[0], labels, classes, temperature=temperatures["none"],
        binary_negative=binary_negative,
    )  # fmt: skip
    if views != "none":
        mean = evaluation_metrics(logits, labels, classes, temperature=temperatures[views])
        metrics["tta"] = {"views": views, **{key: mean[key] for key in _TTA_KEYS}}
    return metrics


def artifact_logits(
    artifact_dir: Path, images: LabelledImages, *, batch_size: int = 32, tta: str = "none"
) -> tuple[np.ndarray, np.ndarray, OnnxClassifier]:
    """The artifact's ``(V, N, C)`` logits for the ``tta`` views of ``images``, their labels
    in the model's class order, and the classifier (its ``temperature`` is the one for
    those views)."""
    classifier = OnnxClassifier(artifact_dir, tta=tta)
    index = {name: i for i, name in enumerate(classifier.classes)}
    unknown = sorted(set(images.classes) - set(index))
    if unknown:
        raise DatasetError(
            f"the data has class(es) {unknown} that the model does not know "
            f"(model classes: {list(classifier.classes)})"
        )
    labels = np.array([index[images.classes[label]] for label in images.labels])
    logits = []
    starts = range(0, len(images), batch_size)
    for start in track(starts, description="Evaluating", transient=True):
        batch = [classifier.decode(path) for path in images.paths[start : start + batch_size]]
        pixels = np.stack([classifier.preprocess(b) for b in batch])
        logits.append(classifier.view_logits(pixels))
    return np.concatenate(logits, axis=1), labels, classifier


def images_to_evaluate(
    data: str, label_format: LabelFileFormat, *, run_dir: Path | None, split: str | None
) -> LabelledImages:
    """The images of ``data``; only the ``split`` part, of ``run_dir``'s saved split or of
    the parts ``data`` comes split into. A split dataset needs a part named: all of it would
    mix training images into the score."""
    dataset = open_dataset(data, label_format=label_format)
    if split and run_dir:
        saved = load_split(run_dir / SPLIT_FILE, dataset.images)
        return dataset.images.subset(list(saved.indices(split)))
    if split:
        return dataset.part(split)
    if dataset.parts:
        raise DatasetError(
            f"{data} comes split ({dataset.layout}); choose the part to score with --split "
            f"{'test' if 'test' in dataset.parts else 'val'}"
        )
    return dataset.images


def evaluate_and_report(
    model: str,
    artifact_dir: Path,
    *,
    data: str,
    label_file: dict[str, Any],
    run_dir: Path | None = None,
    split: str | None = None,
    out_dir: Path | None = None,
    tta: str = "none",
) -> dict[str, Any]:
    """``convtune evaluate``: the artifact's metrics on the images in ``data`` (only the
    ``split`` part, if given: see :func:`images_to_evaluate`), written as a report to
    ``out_dir`` when given.

    The label file is read with ``run_dir``'s saved settings (the defaults without a run),
    each overridden by ``label_file``; the binary view is the run's too.
    """
    base = load_saved_config(run_dir) if run_dir else FitConfig(data=data, model=model, out="")
    config = replace(base, **label_file)
    images = images_to_evaluate(data, config.label_format(), run_dir=run_dir, split=split)
    logits, labels, classifier = artifact_logits(artifact_dir, images, tta=tta)
    metrics = evaluation_metrics(
        logits, labels, classifier.classes, temperature=classifier.temperature,
        binary_negative=config.binary_negative,
    )  # fmt: skip
    result = {"model": model, "split": split or "all", "views": tta, **metrics}
    if out_dir is not None:
        # matplotlib takes longer to import than a small evaluation takes to run.
        from convtune.training.explain import report_explainer
        from convtune.training.report import report_title, write_report

        report = write_report(
            out_dir, result, logits=logits, labels=labels, paths=images.paths,
            classes=classifier.classes,
            title=report_title(model=model, data_path=data, run_dir=run_dir, split=split),
            history=read_history(run_dir) if run_dir else (),
            explainer=report_explainer(classifier),
        )  # fmt: skip
        result["report"] = str(report)
    return result
