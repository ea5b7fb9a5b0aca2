"""A deterministic, stratified train/val/test split, saved with the run.

The split is stored as paths (not indices) so that resume and evaluate reuse exactly the
same images even if files are later added to the dataset. Its file also holds the class
list, in the model's output order: a run's one record of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convtune.data.datasets import DatasetError, LabelledImages

PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """Indices into one :class:`LabelledImages` for each part: train, val and test."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def indices(self, name: str) -> tuple[int, ...]:
        """The indices of part ``name`` (``train``, ``val`` or ``test``)."""
        return getattr(self, name)


def stratified_split(
    labels: tuple[int, ...] | list[int],
    classes: tuple[str, ...],
    *,
    val_fraction: float,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> Split:
    """Shuffle each class with ``seed`` and cut it into test, val and train, in that order.

    Every class gets at least one validation (and test, if asked) image, so per-class
    metrics exist; a class too small for that is an error that names it.
    """
    if not 0.0 < val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0:
        raise ValueError("val_fraction must be in (0, 1) and test_fraction in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError("val_fraction + test_fraction must leave images for training")
    labels_array = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {name: [] for name in PARTS}
    for label, name in enumerate(classes):
        members = np.flatnonzero(labels_array == label)
        rng.shuffle(members)
        n_test = _part_size(len(members), test_fraction)
        n_val = _part_size(len(members), val_fraction)
        needed = n_test + n_val + 1
        if len(members) < needed:
            raise DatasetError(
                f"class {name!r} has {len(members)} image(s); this split needs at least "
                f"{needed} per class (one each for train{', val' if n_val else ''}"
                f"{', test' if n_test else ''})"
            )
        parts["test"] += members[:n_test].tolist()
        parts["val"] += members[n_test : n_test + n_val].tolist()
        parts["train"] += members[n_test + n_val :].tolist()
    return Split(**{name: tuple(sorted(indices)) for name, indices in parts.items()})


def _part_size(n: int, fraction: float) -> int:
    return 0 if fraction == 0 else max(1, round(n * fraction))


def save_split(path: Path, images: LabelledImages, split: Split, *, seed: int) -> None:
    payload = {
        "seed": seed,
        "classes": list(images.classes),
        **{
            name: [
                [str(images.paths[i]), images.classes[images.labels[i]]]
                for i in split.indices(name)
            ]
            for name in PARTS
        },
    }
    path.write_text(json.dumps(payload, indent=1))


def saved_classes(path: Path) -> tuple[str, ...]:
    """The class names of a saved split, in the model's output order."""
    return tuple(json.loads(path.read_text())["classes"])


def load_split(path: Path, images: LabelledImages) -> Split:
    """Map a saved split back onto ``images``; fail loudly if the dataset has changed."""
    saved = json.loads(path.read_text())
    if tuple(saved["classes"]) != images.classes:
        raise DatasetError(
            f"the classes in {path} {saved['classes']} differ from the dataset's "
            f"{list(images.classes)}"
        )
    index = {str(p): i for i, p in enumerate(images.paths)}
    parts: dict[str, tuple[int, ...]] = {}
    for name in PARTS:
        missing = [p for p, _ in saved[name] if p not in index]
        if missing:
            raise DatasetError(
                f"{len(missing)} image(s) of the saved {name} split are gone, e.g. {missing[0]}"
            )
        parts[name] = tuple(index[p] for p, _ in saved[name])
    return Split(**parts)
