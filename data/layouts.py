"""How a dataset is laid out on disk: recognise the layout, load its images and the parts
(train, val, test) it comes split into, if any.

The layouts are the ones people already have: one folder per class; a pre-split tree
(``root/train/<class>/``, ``root/val/<class>/``, ``root/test/<class>/``, as torchvision's
ImageFolder, timm's and fastai's scripts and Ultralytics expect); a CSV/TSV label file; and
Hugging Face's ``imagefolder`` ``metadata.csv`` (``file_name``, ``label``), alone or in each
split folder. Parts given on disk are used as they are; the caller carves the missing ones
out of train.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from convtune.data.datasets import (
    DatasetError,
    LabelFileFormat,
    LabelledImages,
    load_labelled_images,
    visible_subfolders,
)
from convtune.data.splits import PARTS

# Folder names read as a part of a pre-split tree, lower-cased.
SPLIT_FOLDER_NAMES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
HF_METADATA_FILE = "metadata.csv"
HF_PATH_COLUMN = "file_name"


@dataclass(frozen=True)
class Dataset:
    """All images of a dataset, its layout in words, and the parts it comes split into.

    ``parts`` maps a part name (``train``, ``val``, ``test``) to indices into ``images``;
    it is empty when the dataset is not split on disk.
    """

    images: LabelledImages
    layout: str
    parts: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def part(self, name: str) -> LabelledImages:
        """The images of part ``name``; an error naming the parts there are if it is not one."""
        if name not in self.parts:
            raise DatasetError(
                f"the dataset has no {name} part (its parts: {', '.join(self.parts) or 'none'})"
            )
        return self.images.subset(list(self.parts[name]))

    def without(self, bad_paths: set[Path]) -> Dataset:
        """The dataset with the images at ``bad_paths`` left out of it and of its parts."""
        keep = [i for i, path in enumerate(self.images.paths) if path not in bad_paths]
        position = {index: i for i, index in enumerate(keep)}
        parts = {
            name: tuple(position[i] for i in indices if i in position)
            for name, indices in self.parts.items()
        }
        return Dataset(self.images.subset(keep), self.layout, parts)


def open_dataset(
    data: str | Path,
    *,
    val_data: str | Path | None = None,
    test_data: str | Path | None = None,
    label_format: LabelFileFormat | None = None,
) -> Dataset:
    """The dataset at ``data`` in whichever layout it has; ``val_data`` and ``test_data``
    (class folders or label files) replace the val and test parts ``data`` may hold."""
    label_format = label_format or LabelFileFormat()
    dataset = _open_one(Path(data), label_format)
    given = {name: path for name, path in (("val", val_data), ("test", test_data)) if path}
    if not given:
        return dataset
    parts = {name: dataset.part(name) for name in dataset.parts} or {"train": dataset.images}
    layouts = [dataset.layout]
    for name, path in given.items():
        extra = _open_one(Path(path), label_format)
        if extra.parts:
            raise DatasetError(
                f"--{name}-data {path} is itself split ({extra.layout}); give its {name} "
                f"folder or file instead"
            )
        parts[name] = extra.images
        layouts.append(f"{name}: {extra.layout}")
    return _join_parts(parts, layout="; ".join(layouts))


def _open_one(path: Path, label_format: LabelFileFormat) -> Dataset:
    if path.is_file():
        return _label_file(path, label_format)
    if not path.is_dir():
        raise DatasetError(f"{path} does not exist")
    if (path / HF_METADATA_FILE).is_file():
        return _label_file(path / HF_METADATA_FILE, label_format)
    split_folders = _split_folders(path)
    if not split_folders:
        images = load_labelled_images(path, label_format)
        return Dataset(images, f"class folders {path}/<class>/<image>")
    parts = {}
    for name, folder in split_folders.items():
        if (folder / HF_METADATA_FILE).is_file():
            parts[name] = _label_file(folder / HF_METADATA_FILE, label_format).images
        else:
            _refuse_images_without_classes(folder, path)
            parts[name] = load_labelled_images(folder, label_format)
    names = ",".join(folder.name for folder in split_folders.values())
    return _join_parts(parts, layout=f"pre-split tree {path}/{{{names}}}")


def _label_file(path: Path, label_format: LabelFileFormat) -> Dataset:
    if path.name == HF_METADATA_FILE and label_format.path_column == LabelFileFormat.path_column:
        label_format = replace(label_format, path_column=HF_PATH_COLUMN)
        return Dataset(load_labelled_images(path, label_format), f"Hugging Face {path}")
    return Dataset(load_labelled_images(path, label_format), f"label file {path}")


def _split_folders(root: Path) -> dict[str, Path]:
    """The part each split-named sub-folder of ``root`` holds, when ``root`` is a pre-split
    tree; empty when no sub-folder is named like a part. A tree that mixes both is refused:
    no reading of it is safe."""
    folders = visible_subfolders(root)
    by_name = {
        folder: part
        for folder in folders
        for part, names in SPLIT_FOLDER_NAMES.items()
        if folder.name.lower() in names
    }
    if not by_name:
        return {}
    others = [folder.name for folder in folders if folder not in by_name]
    if others:
        raise DatasetError(
            f"{root} mixes split folders ({', '.join(f.name for f in by_name)}) with other "
            f"folders ({', '.join(others[:5])}); expected either {root}/<class>/<image> or "
            f"{root}/<train|val|test>/<class>/<image>"
        )
    parts: dict[str, Path] = {}
    for folder, part in by_name.items():
        if part in parts:
            raise DatasetError(
                f"{root} has two {part} folders ({parts[part].name}, {folder.name}); keep one"
            )
        parts[part] = folder
    if "train" not in parts:
        raise DatasetError(
            f"{root} has {', '.join(f.name for f in parts.values())} but no train folder; "
            f"expected {root}/train/<class>/<image> beside them"
        )
    return {part: parts[part] for part in PARTS if part in parts}


def _refuse_images_without_classes(folder: Path, root: Path) -> None:
    if not visible_subfolders(folder):
        raise DatasetError(
            f"{folder} holds no class folders: a folder named train, val or test is read as "
            f"that part of a pre-split dataset, {folder}/<class>/<image>. If such folders "
            f"are your classes, rename them (e.g. {root}/class_{folder.name})"
        )


def _join_parts(parts: dict[str, LabelledImages], *, layout: str) -> Dataset:
    """One :class:`LabelledImages` over the parts, in train's class order; every part must
    have the same classes."""
    classes = parts["train"].classes
    for name, images in parts.items():
        if missing := sorted(set(classes) - set(images.classes)):
            raise DatasetError(
                f"the {name} part has no images of class(es) {missing}; every part needs "
                f"the same classes (train's: {list(classes)})"
            )
        if extra := sorted(set(images.classes) - set(classes)):
            raise DatasetError(
                f"the {name} part has class(es) {extra} that train has not; every part "
                f"needs the same classes (train's: {list(classes)})"
            )
    index = {name: i for i, name in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    indices: dict[str, tuple[int, ...]] = {}
    for name in PARTS:
        if name not in parts:
            continue
        images = parts[name]
        indices[name] = tuple(range(len(paths), len(paths) + len(images)))
        paths.extend(images.paths)
        labels.extend(index[images.classes[label]] for label in images.labels)
    return Dataset(LabelledImages(tuple(paths), tuple(labels), classes), layout, indices)
