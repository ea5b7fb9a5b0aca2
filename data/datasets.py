"""Labelled images on disk: a folder-per-class tree or a CSV/TSV label file.

``data.layouts`` recognises how a whole dataset is laid out (split on disk or not) and
reads each of its parts with these.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from convtune.data.images import IMAGE_SUFFIXES


class DatasetError(ValueError):
    """The dataset on disk cannot be used as given; the message names the problem."""


@dataclass(frozen=True)
class LabelledImages:
    """Image files with integer labels indexing ``classes`` (sorted, stable)."""

    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: list[int]) -> LabelledImages:
        return LabelledImages(
            paths=tuple(self.paths[i] for i in indices),
            labels=tuple(self.labels[i] for i in indices),
            classes=self.classes,
        )


def load_labelled_images(
    dataset: str | Path, label_format: LabelFileFormat | None = None
) -> LabelledImages:
    """The dataset at ``dataset``: a folder tree (``root/<class>/<image>``) or a label file
    (CSV, TSV, ...)."""
    dataset = Path(dataset)
    if dataset.is_dir():
        images = read_class_folders(dataset)
    elif dataset.is_file():
        images = read_label_file(dataset, label_format or LabelFileFormat())
    else:
        raise DatasetError(f"{dataset} does not exist")
    if len(images.classes) < 2:
        raise DatasetError(
            f"{dataset} has only {len(images.classes)} class ({images.classes[0]!r}); "
            "a classifier needs at least 2"
        )
    return images


def visible_subfolders(root: Path) -> list[Path]:
    """``root``'s sub-folders, hidden ones (``.git``, ``.ipynb_checkpoints``) left out, sorted."""
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def read_class_folders(root: Path) -> LabelledImages:
    """One sub-folder per class; hidden files and folders and non-image files are skipped."""
    class_dirs = visible_subfolders(root)
    if not class_dirs:
        raise DatasetError(
            f"{root} has no class folders; expected {root}/<class>/<image> (or pass a label file)"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        images = sorted(
            path
            for path in class_dir.rglob("*")
            if path.suffix.lower() in IMAGE_SUFFIXES
            and path.is_file()
            and not any(name.startswith(".") for name in path.relative_to(class_dir).parts)
        )
        if not images:
            raise DatasetError(f"class folder {class_dir} holds no images")
        paths.extend(images)
        labels.extend([label] * len(images))
    return LabelledImages(tuple(paths), tuple(labels), tuple(d.name for d in class_dirs))


@dataclass(frozen=True)
class LabelFileFormat:
    """How to read a label file.

    ``separator``: ``auto`` (tab for ``.tsv``, else comma), ``,``, ``\t``, ``;`` or
    ``whitespace`` (runs of spaces/tabs, as in ELPV's ``labels.csv``). Columns are header
    names, or 0-based indices when ``header`` is False. ``label_map`` renames raw labels
    to class names (``{"0.0": "functional", ...}``; numeric keys match numerically, so
    ``1``, ``1.0`` and ``1.00`` are one label); with a map, its order is the class order
    and a label outside it is an error.
    """

    separator: str = "auto"
    header: bool = True
    path_column: str = "path"
    label_column: str = "label"
    label_map: tuple[tuple[str, str], ...] | None = None


def read_label_file(label_file: Path, label_format: LabelFileFormat) -> LabelledImages:
    """Images listed in a label file; paths are relative to the file's folder."""
    rows = _read_rows(label_file, label_format)
    if not rows:
        raise DatasetError(f"{label_file} lists no images")
    if label_format.label_map:
        mapping = {_label_key(raw): name for raw, name in label_format.label_map}
        unknown = sorted({label for _, label in rows if _label_key(label) not in mapping})
        if unknown:
            raise DatasetError(
                f"{label_file} has label(s) {unknown[:5]} that the label map does not name"
            )
        rows = [(path, mapping[_label_key(label)]) for path, label in rows]
        classes = tuple(dict.fromkeys(name for _, name in label_format.label_map))
    else:
        classes = tuple(sorted({label for _, label in rows}))
    index = {name: i for i, name in enumerate(classes)}
    base = label_file.parent
    paths = tuple((base / path).resolve() for path, _ in rows)
    missing_files = [p for p in paths if not p.is_file()]
    if missing_files:
        raise DatasetError(
            f"{label_file} lists {len(missing_files)} file(s) that do not exist, "
            f"e.g. {missing_files[0]}"
        )
    return LabelledImages(paths, tuple(index[label] for _, label in rows), classes)


def _read_rows(label_file: Path, label_format: LabelFileFormat) -> list[tuple[str, str]]:
    """(path, raw label) per non-empty line."""
    lines = [line for line in label_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    separator = label_format.separator
    if separator == "auto":
        separator = "\t" if label_file.suffix.lower() == ".tsv" else ","
    if separator == "whitespace":
        table = [line.split() for line in lines]
    else:
        table = list(csv.reader(lines, delimiter=separator))
    columns = (label_format.path_column, label_format.label_column)
    if label_format.header:
        header, table = (table[0] if table else []), table[1:]
        missing = [c for c in columns if c not in header]
        if missing:
            raise DatasetError(
                f"{label_file} has no column(s) {missing}; its columns are {header}. "
                "Choose them with --path-column/--label-column (or --no-header)."
            )
        positions = [header.index(c) for c in columns]
    else:
        try:
            positions = [int(c) for c in columns]
        except ValueError as error:
            raise DatasetError(
                "without a header, --path-column and --label-column are 0-based column "
                f"numbers, got {columns}"
            ) from error
    rows = []
    for number, fields in enumerate(table, start=2 if label_format.header else 1):
        if len(fields) <= max(positions):
            raise DatasetError(f"{label_file}:{number} has {len(fields)} column(s): {fields}")
        rows.append((fields[positions[0]], fields[positions[1]]))
    return rows


def _label_key(label: object) -> str:
    text = str(label).strip()
    try:
        return repr(float(text))
    except ValueError:
        return text
