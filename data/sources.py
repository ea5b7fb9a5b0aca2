"""Find labelled images: a folder-per-class tree or a CSV/TSV label file."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from data.images import IMAGE_SUFFIXES, ImageDecodeError, decode_rgb


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

    def without(self, bad_paths: set[Path]) -> LabelledImages:
        keep = [i for i, path in enumerate(self.paths) if path not in bad_paths]
        return self.subset(keep)


def load_labelled_images(
    source: str | Path,
    *,
    path_column: str = "path",
    label_column: str = "label",
) -> LabelledImages:
    """Read a folder tree (``root/<class>/<image>``) or a ``.csv``/``.tsv`` label file."""
    source = Path(source)
    if source.is_dir():
        images = scan_folder_tree(source)
    elif source.is_file():
        images = read_label_file(source, path_column=path_column, label_column=label_column)
    else:
        raise DatasetError(f"{source} does not exist")
    if len(images.classes) < 2:
        raise DatasetError(
            f"{source} has only {len(images.classes)} class ({images.classes[0]!r}); "
            "a classifier needs at least 2"
        )
    return images


def scan_folder_tree(root: Path) -> LabelledImages:
    """One sub-folder per class; hidden files and folders and non-image files are skipped."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
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
            and not any(part.startswith(".") for part in path.relative_to(class_dir).parts)
        )
        if not images:
            raise DatasetError(f"class folder {class_dir} holds no images")
        paths.extend(images)
        labels.extend([label] * len(images))
    return LabelledImages(tuple(paths), tuple(labels), tuple(d.name for d in class_dirs))


def read_label_file(
    label_file: Path, *, path_column: str = "path", label_column: str = "label"
) -> LabelledImages:
    """A CSV (``,``) or TSV (``.tsv``, tab) file with a header; paths relative to the file."""
    delimiter = "\t" if label_file.suffix.lower() == ".tsv" else ","
    with label_file.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        missing = {path_column, label_column} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(
                f"{label_file} has no column(s) {sorted(missing)}; its columns are "
                f"{reader.fieldnames}. Choose them with --path-column/--label-column."
            )
        rows = [(row[path_column], row[label_column]) for row in reader]
    if not rows:
        raise DatasetError(f"{label_file} lists no images")
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


def drop_unreadable(
    images: LabelledImages, *, skip_bad_images: bool
) -> tuple[LabelledImages, list[tuple[Path, str]]]:
    """Decode every image once; fail on the first bad file, or drop the bad ones.

    Returns the usable images and the ``(path, reason)`` of each one dropped.
    """
    from rich.progress import track

    bad: list[tuple[Path, str]] = []
    for path in track(images.paths, description="Checking images", transient=True):
        try:
            decode_rgb(path, draft_size=(64, 64))
        except ImageDecodeError as error:
            if not skip_bad_images:
                raise DatasetError(
                    f"{error}. Fix or remove the file, or pass --skip-bad-images"
                ) from error
            bad.append((path, str(error)))
    return images.without({path for path, _ in bad}), bad
