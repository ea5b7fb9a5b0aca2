"""A deterministic, stratified train/val/test split, saved with the run.

The split is stored as paths (not indices) so that resume and evaluate reuse exactly the
same images even if files are later added to the dataset. Its file also holds the class
list, in the model's output order: a run's one record of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
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
    labels: Sequence[int],
    classes: tuple[str, ...],
    *,
    val_fraction: float,
    test_fraction: float = 0.0,
    seed: int = 0,
    groups: Iterable[Sequence[int]] = (),
) -> Split:
    """Shuffle each class with ``seed`` and cut it into test, val and train, in that order.

    Every class gets at least one validation (and test, if asked) image, so per-class
    metrics exist; classes too small for that are an error that names them and the fix.
    The images of a group (copies of one image) go to one part together, so no copy leaks
    into val or test from train; sizes count groups, not images.
    """
    if not 0.0 <= val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0:
        raise ValueError("val_fraction and test_fraction must be in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError("val_fraction + test_fraction must leave images for training")
    labels_array = np.asarray(labels)
    representative = np.arange(len(labels_array))
    for group in groups:
        if group:
            representative[list(group)] = min(group)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {name: [] for name in PARTS}
    too_small: dict[str, int] = {}
    for label, name in enumerate(classes):
        members = np.flatnonzero(labels_array == label)
        units = np.unique(representative[members])
        rng.shuffle(units)
        n_test = _part_size(len(units), test_fraction)
        n_val = _part_size(len(units), val_fraction)
        if len(units) < _images_needed(len(units), val_fraction, test_fraction):
            too_small[name] = len(units)
            continue
        cuts = {"test": units[:n_test], "val": units[n_test : n_test + n_val],
                "train": units[n_test + n_val :]}  # fmt: skip
        for part, chosen in cuts.items():
            parts[part] += members[np.isin(representative[members], chosen)].tolist()
    if too_small:
        raise DatasetError(_too_small_message(too_small, val_fraction, test_fraction))
    return Split(**{name: tuple(sorted(indices)) for name, indices in parts.items()})


def _too_small_message(sizes: dict[str, int], val_fraction: float, test_fraction: float) -> str:
    """The error for classes too small to split: each with the size it needs, and the fix."""
    fractions = (val_fraction, test_fraction)
    least = {name: next(n for n in range(size + 1, 2**31) if n >= _images_needed(n, *fractions))
             for name, size in sizes.items()}  # fmt: skip
    named = ", ".join(f"{name!r} has {sizes[name]} (needs {least[name]})" for name in sizes)
    flags = {"--val-fraction": val_fraction, "--test-fraction": test_fraction}
    asked = {flag: fraction for flag, fraction in flags.items() if fraction}
    settings = " and ".join(f"{flag} {fraction:g}" for flag, fraction in asked.items())
    return (
        f"class(es) with too few distinct images to split with {settings}: {named}. "
        f"Add images to them, lower {'/'.join(asked)}, or drop or merge the class"
    )


def complete_split(
    labels: Sequence[int],
    classes: tuple[str, ...],
    *,
    given: Mapping[str, Sequence[int]],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    groups: Iterable[Sequence[int]] = (),
) -> Split:
    """The parts ``given`` as they are; val and test, where not given, carved out of train
    (all images when no part is given) by :func:`stratified_split`."""
    train = list(given.get("train", range(len(labels))))
    if "val" in given and "test" in given:
        return Split(**{name: tuple(given[name]) for name in PARTS})
    position = {index: i for i, index in enumerate(train)}
    carved = stratified_split(
        [labels[i] for i in train],
        classes,
        val_fraction=0.0 if "val" in given else val_fraction,
        test_fraction=0.0 if "test" in given else test_fraction,
        seed=seed,
        groups=[[position[i] for i in group if i in position] for group in groups],
    )
    return Split(
        **{
            name: tuple(given[name]) if name in given and name != "train"
            else tuple(train[i] for i in carved.indices(name))
            for name in PARTS
        }
    )  # fmt: skip


def _images_needed(size: int, val_fraction: float, test_fraction: float) -> int:
    """Distinct images a class of ``size`` needs: its val and test parts, and one to train."""
    return _part_size(size, val_fraction) + _part_size(size, test_fraction) + 1


def _part_size(n: int, fraction: float) -> int:
    """Images of a class of ``n`` that a part of ``fraction`` gets: at least one when asked."""
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


def saved_part(path: Path, name: str) -> list[tuple[str, str]]:
    """Part ``name`` of a saved split as ``(image path, class name)`` pairs."""
    return [(str(image), str(label)) for image, label in json.loads(path.read_text())[name]]


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
