"""Dataset layouts as people have them: class folders, pre-split trees, label files,
Hugging Face's metadata.csv, and separate val/test sets; and the split completed from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convtune.data.datasets import DatasetError
from convtune.data.layouts import open_dataset
from convtune.data.splits import complete_split, stratified_split

CLASSES = ("cat", "dog")


def write_images(folder: Path, count: int, *, seed: int = 0) -> list[Path]:
    """``count`` distinct small PNGs in ``folder`` (random pixels, so no two are equal)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash((str(folder), seed))) % 2**32)
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def pre_split_tree(root: Path, parts: dict[str, int]) -> Path:
    for part, count in parts.items():
        for name in CLASSES:
            write_images(root / part / name, count)
    return root


def test_class_folders_are_one_unsplit_dataset(tmp_path: Path) -> None:
    for name in CLASSES:
        write_images(tmp_path / name, 3)
    dataset = open_dataset(tmp_path)
    assert dataset.images.classes == CLASSES and len(dataset.images) == 6
    assert dataset.parts == {} and dataset.layout.startswith("class folders")


@pytest.mark.parametrize("val_name", ["val", "valid", "Validation"])
def test_pre_split_tree_keeps_its_parts(tmp_path: Path, val_name: str) -> None:
    pre_split_tree(tmp_path, {"train": 4, val_name: 2, "test": 3})
    dataset = open_dataset(tmp_path)
    assert dataset.images.classes == CLASSES
    assert {name: len(indices) for name, indices in dataset.parts.items()} == {
        "train": 8, "val": 4, "test": 6,
    }  # fmt: skip
    assert all(path.parts[-3] == val_name for path in dataset.part("val").paths)
    assert "pre-split tree" in dataset.layout and val_name in dataset.layout
    split = complete_split(
        dataset.images.labels, dataset.images.classes, given=dataset.parts,
        val_fraction=0.5, test_fraction=0.5, seed=0,
    )  # fmt: skip
    assert {name: split.indices(name) for name in dataset.parts} == dataset.parts


def test_train_and_test_tree_carves_val_from_train_only(tmp_path: Path) -> None:
    pre_split_tree(tmp_path, {"train": 10, "test": 3})
    dataset = open_dataset(tmp_path)
    split = complete_split(
        dataset.images.labels, dataset.images.classes, given=dataset.parts,
        val_fraction=0.2, test_fraction=0.3, seed=0,
    )  # fmt: skip
    assert split.test == dataset.parts["test"]  # the given test part, not 30 % of train
    assert len(split.val) == 4 and len(split.train) == 16
    assert set(split.val) | set(split.train) == set(dataset.parts["train"])


def test_a_class_missing_from_a_part_is_named(tmp_path: Path) -> None:
    pre_split_tree(tmp_path, {"train": 3, "test": 2})
    write_images(tmp_path / "train" / "bird", 3)
    write_images(tmp_path / "test" / "fish", 3)
    with pytest.raises(
        DatasetError, match=r"the test part has no images of class\(es\) \['bird'\]"
    ):
        open_dataset(tmp_path)


def test_split_named_folders_holding_images_are_refused(tmp_path: Path) -> None:
    write_images(tmp_path / "train", 3)
    write_images(tmp_path / "test", 3)
    with pytest.raises(DatasetError, match=r"holds no class folders.*train/<class>/<image>"):
        open_dataset(tmp_path)


def test_split_folders_mixed_with_class_folders_are_refused(tmp_path: Path) -> None:
    pre_split_tree(tmp_path, {"train": 2})
    write_images(tmp_path / "cows", 2)
    with pytest.raises(DatasetError, match=r"mixes split folders \(train\) with other.*cows"):
        open_dataset(tmp_path)


def test_a_split_tree_needs_a_train_part(tmp_path: Path) -> None:
    pre_split_tree(tmp_path, {"val": 2, "test": 2})
    with pytest.raises(DatasetError, match="no train folder"):
        open_dataset(tmp_path)


def hugging_face_folder(folder: Path, count: int) -> Path:
    rows = ["file_name,label"]
    for name in CLASSES:
        for path in write_images(folder / "images" / name, count):
            rows.append(f"{path.relative_to(folder)},{name}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_hugging_face_metadata_csv_in_a_folder_or_given_as_a_file(tmp_path: Path) -> None:
    hugging_face_folder(tmp_path, 3)
    for data in (tmp_path, tmp_path / "metadata.csv"):
        dataset = open_dataset(data)
        assert dataset.images.classes == CLASSES and len(dataset.images) == 6
        assert dataset.layout.startswith("Hugging Face")


def test_hugging_face_split_folders(tmp_path: Path) -> None:
    hugging_face_folder(tmp_path / "train", 4)
    hugging_face_folder(tmp_path / "test", 2)
    dataset = open_dataset(tmp_path)
    assert {name: len(i) for name, i in dataset.parts.items()} == {"train": 8, "test": 4}


def test_val_and_test_data_replace_the_parts_of_data(tmp_path: Path) -> None:
    pre_split_tree(tmp_path / "tree", {"train": 4, "val": 2})
    for name in CLASSES:
        write_images(tmp_path / "other_val" / name, 3)
    # A label file listing dog before cat: its labels follow train's class order.
    rows = ["path,label"]
    for name in reversed(CLASSES):
        rows += [f"{p.relative_to(tmp_path)},{name}" for p in write_images(tmp_path / name, 1)]
    labels = tmp_path / "test.csv"
    labels.write_text("\n".join(rows) + "\n")
    dataset = open_dataset(tmp_path / "tree", val_data=tmp_path / "other_val", test_data=labels)
    assert {name: len(i) for name, i in dataset.parts.items()} == {"train": 8, "val": 6, "test": 2}
    assert all("other_val" in str(path) for path in dataset.part("val").paths)
    test = dataset.part("test")
    assert [test.classes[label] for label in test.labels] == [
        path.parent.name for path in test.paths
    ]


def test_val_data_beside_unsplit_class_folders(tmp_path: Path) -> None:
    for name in CLASSES:
        write_images(tmp_path / "train" / name, 5)
        write_images(tmp_path / "held" / name, 2)
    dataset = open_dataset(tmp_path / "train", val_data=tmp_path / "held")
    split = complete_split(
        dataset.images.labels, dataset.images.classes, given=dataset.parts,
        val_fraction=0.2, test_fraction=0.0, seed=0,
    )  # fmt: skip
    assert split.val == dataset.parts["val"] and len(split.train) == 10 and split.test == ()


def test_val_data_that_is_itself_split_is_refused(tmp_path: Path) -> None:
    for name in CLASSES:
        write_images(tmp_path / "data" / name, 3)
    pre_split_tree(tmp_path / "tree", {"train": 2, "val": 2})
    with pytest.raises(DatasetError, match="is itself split"):
        open_dataset(tmp_path / "data", val_data=tmp_path / "tree")


def test_copies_of_an_image_stay_in_one_part() -> None:
    labels = [0] * 20 + [1] * 20
    # Images 0-5 are copies of one image, 20-23 of another.
    groups = [tuple(range(6)), tuple(range(20, 24))]
    for seed in range(10):
        split = stratified_split(
            labels, CLASSES, val_fraction=0.3, test_fraction=0.2, seed=seed, groups=groups
        )
        for group in groups:
            holding = [name for name in ("train", "val", "test") if group[0] in split.indices(name)]
            assert all(i in split.indices(holding[0]) for i in group)
    ungrouped = stratified_split(labels, CLASSES, val_fraction=0.3, test_fraction=0.2, seed=3)
    assert ungrouped == stratified_split(
        labels, CLASSES, val_fraction=0.3, test_fraction=0.2, seed=3, groups=()
    )


def test_a_class_of_copies_is_too_small_to_split() -> None:
    labels = [0] * 10 + [1] * 3
    with pytest.raises(DatasetError, match=r"too few distinct images .*'dog' has 1 \(needs 2\)"):
        stratified_split(labels, CLASSES, val_fraction=0.2, groups=[(10, 11, 12)])
