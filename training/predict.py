"""Classify image files with an exported artifact: what ``convtune predict`` runs.

The images named on the command line (files, folders, globs, label files) are listed
first, so that a path matching nothing is an error before any work; then they go through
the model in fixed-size batches while a small thread pool decodes the batches ahead, and
each answer is handed on as soon as its batch is done. Memory therefore holds a few
batches whatever the number of images, and a file that cannot be decoded becomes an error
answer of its own instead of failing the job.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import os
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from convtune.data.datasets import LabelFileFormat, read_label_file
from convtune.data.images import IMAGE_SUFFIXES, ImageDecodeError
from convtune.data.layouts import HF_PATH_COLUMN
from convtune.models.inference import OnnxClassifier
from convtune.training.prediction_output import open_writer, prediction_row

LABEL_FILE_SUFFIXES = (".csv", ".tsv")
# A label file's own default columns, or Hugging Face's imagefolder metadata.csv's.
PATH_COLUMNS = (LabelFileFormat.path_column, HF_PATH_COLUMN)
LABEL_COLUMN = LabelFileFormat.label_column
_GLOB_CHARACTERS = frozenset("*?[")
# Batches decoded ahead of the one the model runs: one keeps the model busy while the
# next is decoded, a second absorbs uneven decode times.
_BATCHES_AHEAD = 2
_REPORTED_FAILURES = 10
DEFAULT_BATCH_SIZE = 64
# Decoding threads run beside onnxruntime's own (one per core): two keep a small model fed
# without starving a large one of cores (docs/benchmarks.md, "convtune predict at scale").
DEFAULT_DECODE_THREADS = 2


@dataclass(frozen=True)
class ImageInput:
    """One image to classify: its path as the answer names it, and its label where the
    input says it (a label file, or a folder of class folders)."""

    path: Path
    label: str | None = None


@dataclass(frozen=True)
class Prediction:
    """The answer for one image: its probabilities, or why it has none."""

    image: ImageInput
    probabilities: np.ndarray | None = None
    error: str | None = None


def collect_inputs(arguments: Sequence[str | Path], *, classes: Sequence[str]) -> list[ImageInput]:
    """Every image the ``arguments`` name, each once, in the order given (a folder's and a
    glob's in sorted order, a label file's in its order).

    A folder is searched recursively for image files (hidden ones skipped); its images are
    labelled with their top-level sub-folder when every image lies in one named after a
    model class (``classes``). A ``.csv``/``.tsv`` file is a label file. A path that does
    not exist but holds glob characters is expanded (``**`` spans folders).
    """
    inputs: dict[Path, ImageInput] = {}
    for argument in arguments:
        for image in _expand(Path(argument), classes):
            inputs.setdefault(image.path.resolve(), image)
    return list(inputs.values())


def _expand(path: Path, classes: Sequence[str]) -> list[ImageInput]:
    if path.is_dir():
        return _folder_inputs(path, classes)
    if path.is_file():
        if path.suffix.lower() in LABEL_FILE_SUFFIXES:
            return _label_file_inputs(path)
        return [ImageInput(path)]
    if _GLOB_CHARACTERS.intersection(str(path)):
        return _glob_inputs(str(path), classes)
    raise FileNotFoundError(f"{path} does not exist")


def _folder_inputs(folder: Path, classes: Sequence[str]) -> list[ImageInput]:
    images = _images_under(folder)
    if not images:
        raise FileNotFoundError(
            f"{folder} holds no images (files ending in {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    class_names = [image.relative_to(folder).parts[0] for image in images]
    nested = all(len(image.relative_to(folder).parts) > 1 for image in images)
    if nested and set(class_names) <= set(classes):
        return [ImageInput(image, name) for image, name in zip(images, class_names, strict=True)]
    return [ImageInput(image) for image in images]


def _images_under(folder: Path) -> list[Path]:
    """The image files under ``folder``, recursively, hidden files and folders skipped."""
    images = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        images.extend(
            Path(directory, name)
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
        )
    return sorted(images, key=lambda image: image.relative_to(folder).parts)


def _glob_inputs(pattern: str, classes: Sequence[str]) -> list[ImageInput]:
    matches = [Path(match) for match in sorted(glob.glob(pattern, recursive=True))]
    inputs = [
        image
        for match in matches
        if match.is_dir() or match.suffix.lower() in IMAGE_SUFFIXES
        for image in (_folder_inputs(match, classes) if match.is_dir() else [ImageInput(match)])
    ]
    if not inputs:
        raise FileNotFoundError(f"{pattern} matches no image files or folders")
    return inputs


def _label_file_inputs(label_file: Path) -> list[ImageInput]:
    """The images a label file lists, with their labels; a file without a ``label``
    column is a plain list of images."""
    header = _label_file_header(label_file)
    path_column = next((name for name in PATH_COLUMNS if name in header), None)
    if path_column is None:
        raise ValueError(
            f"{label_file} has no {' or '.join(PATH_COLUMNS)} column (its columns are "
            f"{header}); give predict a CSV/TSV with a header naming the image column "
            f"{PATH_COLUMNS[0]!r} (or {PATH_COLUMNS[1]!r}) and, optionally, {LABEL_COLUMN!r}"
        )
    labelled = LABEL_COLUMN in header
    label_format = LabelFileFormat(
        path_column=path_column, label_column=LABEL_COLUMN if labelled else path_column
    )
    listed = read_label_file(label_file, label_format)
    return [
        ImageInput(path, listed.classes[label] if labelled else None)
        for path, label in zip(listed.paths, listed.labels, strict=True)
    ]


def _label_file_header(label_file: Path) -> list[str]:
    delimiter = "\t" if label_file.suffix.lower() == ".tsv" else ","
    with label_file.open(encoding="utf-8", newline="") as stream:
        return next(csv.reader(stream, delimiter=delimiter), [])


def predict_stream(
    classifier: OnnxClassifier,
    images: Iterable[ImageInput],
    *,
    batch_size: int,
    decode_threads: int,
) -> Iterator[Prediction]:
    """A :class:`Prediction` per image, in order, computed ``batch_size`` images at a time
    while ``decode_threads`` threads decode and preprocess the next batches."""
    loaded = _loaded_ahead(
        classifier, images, threads=decode_threads, ahead=batch_size * _BATCHES_AHEAD
    )
    batch: list[tuple[ImageInput, np.ndarray | str]] = []
    for item in loaded:
        batch.append(item)
        if len(batch) == batch_size:
            yield from _predict_batch(classifier, batch)
            batch = []
    yield from _predict_batch(classifier, batch)


def _predict_batch(
    classifier: OnnxClassifier, batch: list[tuple[ImageInput, np.ndarray | str]]
) -> Iterator[Prediction]:
    pixels = [outcome for _, outcome in batch if isinstance(outcome, np.ndarray)]
    rows = iter(classifier.probabilities(np.stack(pixels)) if pixels else ())
    for image, outcome in batch:
        if isinstance(outcome, np.ndarray):
            yield Prediction(image, probabilities=next(rows))
        else:
            yield Prediction(image, error=outcome)


def _loaded_ahead(
    classifier: OnnxClassifier, images: Iterable[ImageInput], *, threads: int, ahead: int
) -> Iterator[tuple[ImageInput, np.ndarray | str]]:
    """``(image, its model input or the reason it has none)`` in order, at most ``ahead``
    images being loaded at a time."""
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="convtune-decode")
    pending: deque[tuple[ImageInput, Future]] = deque()
    try:
        for image in images:
            pending.append((image, pool.submit(_load, classifier, image.path)))
            if len(pending) >= ahead:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()
    finally:
        pool.shutdown(cancel_futures=True)


def _load(classifier: OnnxClassifier, path: Path) -> np.ndarray | str:
    try:
        return classifier.preprocess(classifier.decode(path))
    except ImageDecodeError as error:
        return str(error)


@dataclass
class PredictionTally:
    """What the end-of-job summary says: counts, the first failures, and the accuracy on
    the images whose label the input gave."""

    classes: tuple[str, ...]
    answered: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    failed: int = 0
    scored: int = 0
    correct: int = 0
    unknown_labels: Counter = field(default_factory=Counter)

    def add(self, prediction: Prediction) -> None:
        if prediction.probabilities is None:
            self.failed += 1
            if len(self.failures) < _REPORTED_FAILURES:
                self.failures.append((str(prediction.image.path), str(prediction.error)))
            return
        self.answered += 1
        label = prediction.image.label
        if label is None:
            return
        if label not in self.classes:
            self.unknown_labels[label] += 1
            return
        self.scored += 1
        self.correct += self.classes[int(np.argmax(prediction.probabilities))] == label

    def summary(self, *, destination: str, evaluate_command: str) -> list[str]:
        """The lines for stderr: the count and where the answers went (``destination``:
        ``in FILE``, ``on stdout``), the failed files, and the accuracy where labels were
        given (and ``evaluate_command`` for more)."""
        lines = [
            f"{self.answered} image(s) classified, {self.failed} failed; results {destination}"
        ]
        lines += [
            f"  failed: {reason if path in reason else f'{path}: {reason}'}"
            for path, reason in self.failures
        ]
        if self.failed > len(self.failures):
            lines.append(f"  ... and {self.failed - len(self.failures)} more (their error rows)")
        if self.scored:
            lines.append(
                f"accuracy {self.correct / self.scored:.4f} ({self.correct}/{self.scored} "
                f"labelled images); per-class scores and a report: {evaluate_command}"
            )
        if self.unknown_labels:
            names = sorted(self.unknown_labels)
            lines.append(
                f"{sum(self.unknown_labels.values())} image(s) labelled with classes the "
                f"model does not know, not scored: {names[:10]} (model classes: "
                f"{list(self.classes)})"
            )
        return lines


def predict_files(
    artifact_dir: Path,
    arguments: Sequence[str | Path],
    *,
    model: str,
    output: Path | None,
    output_format: str = "json",
    top_k: int = 5,
    tta: str = "none",
    batch_size: int = DEFAULT_BATCH_SIZE,
    decode_threads: int = DEFAULT_DECODE_THREADS,
) -> PredictionTally:
    """``convtune predict``: classify every image ``arguments`` name and write the answers
    to ``output`` (stdout if None) in ``output_format`` as they come."""
    if top_k < 1:
        raise ValueError("--top-k must be a positive integer")
    if batch_size < 1:
        raise ValueError("--batch-size must be a positive integer")
    classifier = OnnxClassifier(artifact_dir, tta=tta)
    images = collect_inputs(arguments, classes=classifier.classes)
    tally = PredictionTally(classifier.classes)
    with _opened(output) as stream, _progress(len(images), stream) as advance:
        writer = open_writer(
            output_format, stream, model=model, classes=classifier.classes,
            labelled=any(image.label is not None for image in images),
        )  # fmt: skip
        for prediction in predict_stream(
            classifier, images, batch_size=batch_size, decode_threads=decode_threads
        ):
            writer.write(prediction_row(prediction, classifier.classes, top_k))
            tally.add(prediction)
            advance()
        writer.close()
    return tally


@contextlib.contextmanager
def _opened(output: Path | None) -> Iterator[TextIO]:
    if output is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    with output.open("w", encoding="utf-8", newline="") as stream:
        yield stream


@contextlib.contextmanager
def _progress(total: int, output: TextIO) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr while the block runs, where stderr is a terminal that
    the answers are not being written to."""
    if not sys.stderr.isatty() or (output is sys.stdout and sys.stdout.isatty()):
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(
        console=Console(stderr=True), transient=True, redirect_stdout=False,
        redirect_stderr=False,
    ) as progress:  # fmt: skip
        task = progress.add_task("Classifying", total=total)
        yield lambda: progress.advance(task)
