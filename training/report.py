"""The evaluation report: ``metrics.json`` and a self-contained ``report.html``.

The HTML embeds its figures as PNG data URIs, so the file can be mailed or archived alone:
confusion matrix, per-class table, reliability diagrams before and after temperature
scaling, a gallery of the most confidently wrong images (each with the activation map of
the class it was mistaken for, where an explainer is given) and, for a training run, its
training curves.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# matplotlib's object API renders without pyplot's global state or a display backend.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from convtune.data.images import ImageDecodeError, decode_rgb
from convtune.models.artifact import METRICS_FILE, REPORT_FILE
from convtune.models.cam import overlay
from convtune.models.inference import view_probabilities
from convtune.training.explain import Explainer
from convtune.training.history import FROZEN
from convtune.training.metrics import ECE_BINS, reliability_bins

GALLERY_SIZE = 12
THUMBNAIL = 160  # pixels, the longer side of a gallery image
# Folder names that say nothing about the dataset, skipped when naming it after a label file.
_GENERIC_FOLDERS = frozenset({"data", "dataset", "datasets", "images", "labels", "annotations"})


def dataset_name(data_path: str | Path) -> str:
    """A short name for the dataset at ``data_path``: a folder tree's name; for a label file,
    the nearest folder above it with a telling name and the file's name,
    e.g. ``.../elpv_dataset/data/labels.csv`` → ``elpv_dataset (labels.csv)``."""
    path = Path(data_path).resolve()
    if path.is_dir():
        return path.name
    names = [p.name for p in path.parents if p.name and p.name.lower() not in _GENERIC_FOLDERS]
    return f"{names[0]} ({path.name})" if names else path.name


def report_title(
    *, model: str, data_path: str | Path, run_dir: str | Path | None, split: str | None
) -> str:
    """``MODEL on DATASET, run RUN_DIR: SPLIT split`` (the run and split where known)."""
    title = f"{model} on {dataset_name(data_path)}"
    if run_dir is not None:
        title += f", run {run_dir}"
    return f"{title}: {split} split" if split else title


def write_report(
    out_dir: Path,
    metrics: dict[str, Any],
    *,
    logits: np.ndarray,
    labels: np.ndarray,
    paths: Sequence[Path],
    classes: tuple[str, ...],
    title: str,
    history: Sequence[dict[str, Any]] = (),
    explainer: Explainer | None = None,
) -> Path:
    """Write ``metrics.json`` and ``report.html`` into ``out_dir``; return the report path.

    ``logits`` are those ``metrics`` were computed from: one view's ``(N, C)`` or V views'
    ``(V, N, C)``. A ``tta`` entry of ``metrics`` gets a column of its own in the summary.

    ``history`` is the training run's per-epoch record (``training.history.read_history``);
    without one the report has no training curves. ``explainer`` draws the activation map
    of the predicted class next to each most confidently wrong image.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    temperature = metrics["temperature"]
    before, after = view_probabilities(logits, 1.0), view_probabilities(logits, temperature)
    reliability = {
        "uncalibrated": reliability_bins(before, labels),
        "calibrated": reliability_bins(after, labels),
    }
    (out_dir / METRICS_FILE).write_text(
        json.dumps({**metrics, "reliability": reliability, "history": list(history)}, indent=2)
        + "\n"
    )
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        _summary_table(metrics),
        "<h2>Confusion matrix</h2>",
        *([_binary_paragraph(metrics["binary"])] if "binary" in metrics else []),
        _img(_confusion_figure(np.array(metrics["confusion_matrix"]), classes)),
        "<h2>Per class</h2>",
        _per_class_table(metrics["per_class"]),
        "<h2>Calibration</h2>",
        _calibration_paragraph(metrics),
        _img(_reliability_figure(reliability)),
        "<h2>Most confidently wrong</h2>",
        _gallery(after, labels, paths, classes, explainer),
    ]
    if history:
        sections += ["<h2>Training curves</h2>", _img(_history_figure(history))]
    path = out_dir / REPORT_FILE
    path.write_text(_page(title, "\n".join(sections)))
    return path


def _summary_table(metrics: dict[str, Any]) -> str:
    """The headline figures; with a ``tta`` entry, the single view's and the views' side by
    side."""
    columns = [metrics] + ([metrics["tta"]] if "tta" in metrics else [])
    rows = [
        ("accuracy", "accuracy", ".4f"),
        ("macro-F1", "macro_f1", ".4f"),
        ("ECE (calibrated)", "ece", ".4f"),
        ("NLL (calibrated)", "nll", ".4f"),
        ("temperature", "temperature", ".3f"),
    ]
    head = f"<tr><th>images</th><td colspan='{len(columns)}'>{metrics['n']}</td></tr>"
    if "tta" in metrics:
        views = html.escape(metrics["tta"]["views"])
        head += f"<tr><th></th><th>single view</th><th>mean of the {views} views</th></tr>"
    body = "".join(
        f"<tr><th>{label}</th>"
        + "".join(f"<td>{column[key]:{spec}}</td>" for column in columns)
        + "</tr>"
        for label, key, spec in rows
    )
    return f"<table>{head}{body}</table>"


def _binary_paragraph(binary: dict[str, Any]) -> str:
    return (
        f"<p>Binary view ({', '.join(binary['negative_classes'])} vs the rest): "
        f"accuracy {binary['accuracy']:.4f}, macro-F1 {binary['macro_f1']:.4f}, "
        f"positive recall {binary['positive_recall']:.4f}, "
        f"positive precision {binary['positive_precision']:.4f}.</p>"
    )


def _calibration_paragraph(metrics: dict[str, Any]) -> str:
    before = metrics["uncalibrated"]
    return (
        f"<p>Temperature T = {metrics['temperature']:.3f} (fitted on the validation split). "
        f"ECE over {ECE_BINS} equal-width bins: {before['ece']:.4f} before, "
        f"{metrics['ece']:.4f} after; NLL {before['nll']:.4f} before, "
        f"{metrics['nll']:.4f} after.</p>"
    )


def _per_class_table(per_class: dict[str, dict[str, float]]) -> str:
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{m['precision']:.3f}</td>"
        f"<td>{m['recall']:.3f}</td><td>{m['f1']:.3f}</td><td>{m['support']}</td></tr>"
        for name, m in per_class.items()
    )
    return f"<table>{head}{body}</table>"


def _confusion_figure(confusion: np.ndarray, classes: tuple[str, ...]) -> Figure:
    size = 1.2 + 0.7 * len(classes)
    figure = Figure(figsize=(size + 1, size))
    axes = figure.subplots()
    image = axes.imshow(confusion, cmap="Blues")
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    threshold = confusion.max() / 2 if confusion.size else 0
    for (i, j), count in np.ndenumerate(confusion):
        colour = "white" if count > threshold else "black"
        axes.text(j, i, str(count), ha="center", va="center", color=colour)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    return figure


def _reliability_figure(reliability: dict[str, list[dict[str, float]]]) -> Figure:
    figure = Figure(figsize=(10, 4.2))
    all_axes = figure.subplots(1, 2, sharey=True)
    for axes, (name, table) in zip(all_axes, reliability.items(), strict=True):
        lower = np.array([row["lower"] for row in table])
        width = table[0]["upper"] - table[0]["lower"]
        accuracy = np.array([row["accuracy"] for row in table])
        counts = np.array([row["count"] for row in table])
        axes.bar(lower, np.where(counts > 0, accuracy, 0), width=width, align="edge",
                 edgecolor="black", label="accuracy")  # fmt: skip
        axes.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        axes.set_title(name)
        axes.set_xlabel("confidence")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.legend(loc="upper left")
    all_axes[0].set_ylabel("accuracy")
    figure.tight_layout()
    return figure


def _history_figure(history: Sequence[dict[str, Any]]) -> Figure:
    """Losses and val accuracy per epoch; the frozen-encoder epochs shaded."""
    epochs = [entry["epoch"] for entry in history]
    frozen = [entry["epoch"] for entry in history if entry["phase"] == FROZEN]
    figure = Figure(figsize=(10, 4))
    loss_axes, accuracy_axes = figure.subplots(1, 2, sharex=True)
    loss_axes.plot(epochs, _series(history, "train_loss"), "o-", label="train loss")
    loss_axes.plot(epochs, _series(history, "val_loss"), "s-", label="val loss")
    loss_axes.set_ylabel("loss")
    accuracy_axes.plot(
        epochs, _series(history, "val_accuracy"), "o-", color="C2", label="val accuracy"
    )
    accuracy_axes.set_ylabel("accuracy")
    accuracy_axes.set_ylim(0, 1)
    for axes in (loss_axes, accuracy_axes):
        if frozen:
            # Each point stands for a whole epoch, so the shading reaches half an epoch past
            # the first and last frozen points; its right edge is where the encoder unfroze.
            span = (min(frozen) - 0.5, max(frozen) + 0.5)
            axes.axvspan(*span, color="0.85", label="encoder frozen")
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(loc="best")
    figure.tight_layout()
    return figure


def _series(history: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """``key`` per epoch, NaN (a gap in the line) where an epoch did not record it."""
    return np.array([np.nan if entry[key] is None else entry[key] for entry in history], float)


def _gallery(
    probabilities: np.ndarray,
    labels: np.ndarray,
    paths: Sequence[Path],
    classes: tuple[str, ...],
    explainer: Explainer | None,
) -> str:
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    if not len(wrong):
        return "<p>No wrong predictions.</p>"
    worst = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:GALLERY_SIZE]
    cells = []
    for i in worst:
        caption = (
            f"{html.escape(Path(paths[i]).name)}<br>true: {html.escape(classes[labels[i]])}"
            f"<br>predicted: {html.escape(classes[predicted[i]])} "
            f"({probabilities[i, predicted[i]]:.2f})"
        )
        images = _thumbnails(paths[i], explainer, int(predicted[i]))
        cells.append(f"<figure>{images}<figcaption>{caption}</figcaption></figure>")
    note = (
        ""
        if explainer is None
        else "<p>Beside each image, the activation map of the class it was taken for: where "
        "in the image the network found the evidence for it (red: most).</p>"
    )
    return f"{note}<div class='gallery'>{''.join(cells)}</div>"


def _thumbnails(path: Path, explainer: Explainer | None, class_index: int) -> str:
    """The image, and with an ``explainer`` the map of ``class_index`` over it."""
    try:
        rgb = decode_rgb(path)
    except ImageDecodeError:
        return "<p>(unreadable)</p>"
    shown = [rgb] if explainer is None else [rgb, overlay(rgb, explainer(rgb, class_index))]
    return "".join(_png_img(image) for image in shown)


def _png_img(rgb: np.ndarray) -> str:
    image = Image.fromarray(rgb)
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f"<img src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def _img(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return f"<img src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def _page(title: str, body: str) -> str:
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
        ".gallery{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;max-width:330px;font-size:12px}"
        "figure img{margin-right:4px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{body}</body></html>\n"
    )
