"""Writing ``convtune predict``'s answers as they come: JSON, JSON lines or CSV.

Each writer writes one answer at a time and keeps none, so a job over any number of images
writes as it goes. JSON keeps the shape ``convtune predict`` has always printed
(``{"model": ..., "results": [...]}``, each result as the service answers one image), so
it needs a closing bracket at the end; JSON lines and CSV are one row per image.
"""

from __future__ import annotations

import csv
import json
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from convtune.models.inference import format_prediction

if TYPE_CHECKING:
    from convtune.training.predict import Prediction

FORMATS = ("json", "jsonl", "csv")
# CSV: one column per class probability, named after the class behind this prefix.
CSV_PROBABILITY_PREFIX = "p_"


def prediction_row(prediction: Prediction, classes: tuple[str, ...], top_k: int) -> dict[str, Any]:
    """One image's answer: ``image`` and either the service's answer (label,
    probabilities, top_k) or ``error``; ``true_label`` where the input gave one."""
    image = prediction.image
    row: dict[str, Any] = {"image": str(image.path)}
    if prediction.probabilities is None:
        row["error"] = prediction.error
    else:
        row.update(format_prediction(prediction.probabilities, classes, top_k))
    if image.label is not None:
        row["true_label"] = image.label
    return row


class PredictionWriter(Protocol):
    def write(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonWriter:
    """``{"model": ..., "results": [...]}``, laid out as ``json.dumps(indent=2)`` would."""

    def __init__(self, stream: TextIO, *, model: str) -> None:
        self.stream = stream
        self.stream.write(f'{{\n  "model": {json.dumps(model)},\n  "results": [')
        self.separator = "\n"

    def write(self, row: dict[str, Any]) -> None:
        self.stream.write(self.separator + textwrap.indent(json.dumps(row, indent=2), "    "))
        self.separator = ",\n"

    def close(self) -> None:
        self.stream.write("\n  ]\n}\n" if self.separator != "\n" else "]\n}\n")


class JsonLinesWriter:
    """One JSON object per line, as ``JsonWriter``'s results."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, row: dict[str, Any]) -> None:
        self.stream.write(json.dumps(row) + "\n")

    def close(self) -> None:
        pass


class CsvWriter:
    """``image, label, probability, top_k`` (``label:probability`` pairs joined by ``;``),
    one ``p_<class>`` column per class, ``true_label`` where labels are known, ``error``."""

    def __init__(self, stream: TextIO, *, classes: Sequence[str], labelled: bool) -> None:
        columns = ["image", "label", "probability", "top_k"]
        columns += [CSV_PROBABILITY_PREFIX + name for name in classes]
        columns += ["true_label"] if labelled else []
        self.writer = csv.DictWriter(stream, [*columns, "error"], lineterminator="\n")
        self.writer.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        flat = {key: row[key] for key in ("image", "true_label", "error") if key in row}
        if "label" in row:
            flat["label"] = row["label"]
            flat["probability"] = row["probabilities"][row["label"]]
            flat["top_k"] = ";".join(f"{top['label']}:{top['probability']}" for top in row["top_k"])
            for name, probability in row["probabilities"].items():
                flat[CSV_PROBABILITY_PREFIX + name] = probability
        self.writer.writerow(flat)

    def close(self) -> None:
        pass


def open_writer(
    output_format: str, stream: TextIO, *, model: str, classes: Sequence[str], labelled: bool
) -> PredictionWriter:
    """The writer of ``output_format`` (one of ``FORMATS``) on ``stream``."""
    if output_format == "json":
        return JsonWriter(stream, model=model)
    if output_format == "jsonl":
        return JsonLinesWriter(stream)
    if output_format == "csv":
        return CsvWriter(stream, classes=classes, labelled=labelled)
    raise ValueError(f"unknown --format {output_format!r}; one of {', '.join(FORMATS)}")
