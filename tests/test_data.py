"""Dataset discovery, the stratified split, transforms and per-worker augmentation seeds."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from convtune.data.datamodule import ImageDataset, seed_worker_transforms
from convtune.data.datasets import (
    DatasetError,
    LabelFileFormat,
    LabelledImages,
    load_labelled_images,
)
from convtune.data.images import decode_rgb
from convtune.data.preprocessing import Preprocessing, build_eval_transform, eval_decode_size
from convtune.data.splits import load_split, save_split, stratified_split
from convtune.data.transforms import Augmentation, build_train_transform
from convtune.training.config import FitConfig

PREPROCESSING = Preprocessing(
    input_size=(32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop_pct=0.875
)
# A fit's default augmentation (FitConfig holds its defaults).
AUGMENTATION = Augmentation(**FitConfig(data="d", model="m", out="o").augmentation_kwargs())


def write_image(path: Path, colour=(200, 50, 50), size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_folder_tree_sorted_classes_and_hidden_files_ignored(tmp_path: Path) -> None:
    for name in ("b.png", "a.jpg", ".hidden.png", "notes.txt", ".cache/x.png"):
        if name.endswith(".txt"):
            (tmp_path / "zebra").mkdir(exist_ok=True)
            (tmp_path / "zebra" / name).write_text("not an image")
        else:
            write_image(tmp_path / "zebra" / name)
    write_image(tmp_path / "ant" / "1.png")
    write_image(tmp_path / ".trash" / "1.png")
    images = load_labelled_images(tmp_path)
    assert images.classes == ("ant", "zebra")
    assert [p.name for p in images.paths] == ["1.png", "a.jpg", "b.png"]
    assert images.labels == (0, 1, 1)


def test_label_files_csv_and_tsv(tmp_path: Path) -> None:
    write_image(tmp_path / "img" / "x.png")
    write_image(tmp_path / "img" / "y.png")
    (tmp_path / "labels.csv").write_text("file,kind\nimg/x.png,dog\nimg/y.png,cat\n")
    (tmp_path / "labels.tsv").write_text("path\tlabel\nimg/x.png\tdog\nimg/y.png\tcat\n")
    from_csv = load_labelled_images(
        tmp_path / "labels.csv", LabelFileFormat(path_column="file", label_column="kind")
    )
    from_tsv = load_labelled_images(tmp_path / "labels.tsv")
    for images in (from_csv, from_tsv):
        assert images.classes == ("cat", "dog")
        assert images.labels == (1, 0)
        assert images.paths[0] == (tmp_path / "img" / "x.png").resolve()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: root.mkdir(), "no class folders"),
        (lambda root: (root / "a").mkdir(parents=True), "holds no images"),
        (lambda root: write_image(root / "only" / "1.png"), "at least 2"),
        (lambda root: None, "does not exist"),
    ],
)
def test_dataset_errors_name_the_problem(tmp_path: Path, setup, message: str) -> None:
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DatasetError, match=message):
        load_labelled_images(root)


def test_label_file_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("image,label\nx.png,a\n")
    with pytest.raises(DatasetError, match=r"no column\(s\) \['path'\]"):
        load_labelled_images(tmp_path / "bad.csv")
    (tmp_path / "gone.csv").write_text("path,label\nmissing.png,a\n")
    with pytest.raises(DatasetError, match="do not exist"):
        load_labelled_images(tmp_path / "gone.csv")


def test_split_is_stratified_disjoint_and_deterministic() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 10
    classes = ("a", "b", "c")
    split = stratified_split(labels, classes, val_fraction=0.2, test_fraction=0.1, seed=7)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert set.union(*parts) == set(range(90))
    assert sum(len(p) for p in parts) == 90
    val_labels = np.bincount([labels[i] for i in split.val])
    test_labels = np.bincount([labels[i] for i in split.test])
    assert val_labels.tolist() == [10, 6, 2] and test_labels.tolist() == [5, 3, 1]
    again = stratified_split(labels, classes, val_fraction=0.2, test_fraction=0.1, seed=7)
    other = stratified_split(labels, classes, val_fraction=0.2, test_fraction=0.1, seed=8)
    assert again == split and other != split


def test_saved_split_round_trips_and_detects_a_changed_dataset(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        for i in range(5):
            write_image(tmp_path / "data" / cls / f"{i}.png")
    images = load_labelled_images(tmp_path / "data")
    split = stratified_split(images.labels, images.classes, val_fraction=0.4, seed=1)
    save_split(tmp_path / "split.json", images, split, seed=1)
    write_image(tmp_path / "data" / "a" / "new.png")  # added later: must not move the split
    grown = load_labelled_images(tmp_path / "data")
    reloaded = load_split(tmp_path / "split.json", grown)
    assert [grown.paths[i] for i in reloaded.val] == [images.paths[i] for i in split.val]
    (tmp_path / "data" / "b" / "0.png").unlink()
    with pytest.raises(DatasetError, match="are gone"):
        load_split(tmp_path / "split.json", load_labelled_images(tmp_path / "data"))


def test_eval_transform_resizes_crops_and_normalises() -> None:
    pixels = np.full((60, 90, 3), (255, 102, 0), dtype=np.uint8)
    out = build_eval_transform(PREPROCESSING)(image=pixels)["image"]
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    expected = (np.array([1.0, 0.4, 0.0]) - np.array(PREPROCESSING.mean)) / np.array(
        PREPROCESSING.std
    )
    assert np.allclose(out.mean(axis=(1, 2)), expected, atol=1e-5)


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_eval_transform_gives_the_pixels_of_the_albumentations_pipeline(size, interpolation):
    # The reference: timm's center mode spelled out with albumentations steps.
    preprocessing = Preprocessing(
        input_size=size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        interpolation=interpolation, crop_pct=0.9,
    )  # fmt: skip
    flag = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR}

    def reference(pixels: np.ndarray) -> np.ndarray:
        h, w = pixels.shape[:2]
        scale = max(size[0] / h, size[1] / w) / 0.9
        crop_h, crop_w = (
            min(h, max(1, round(size[0] / scale))),
            min(w, max(1, round(size[1] / scale))),
        )
        shrinks = size[0] <= crop_h and size[1] <= crop_w
        steps = A.Compose([
            A.CenterCrop(crop_h, crop_w),
            A.Resize(*size, interpolation=cv2.INTER_AREA if shrinks else flag[interpolation]),
            A.Normalize(mean=preprocessing.mean, std=preprocessing.std, max_pixel_value=255.0),
        ])  # fmt: skip
        return steps(image=pixels)["image"].transpose(2, 0, 1)

    transform = build_eval_transform(preprocessing)
    rng = np.random.default_rng(0)
    for shape in [(300, 300), (60, 90), (17, 400), size, (1, 40)]:
        pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        out = transform(image=pixels)["image"]
        assert out.flags.c_contiguous and out.dtype == np.float32
        np.testing.assert_array_equal(out, reference(pixels))


def _corner_marks(size: int) -> np.ndarray:
    """Grey image with a white 4-pixel mark in each corner."""
    pixels = np.full((size, size, 3), 128, dtype=np.uint8)
    for rows in (slice(0, 4), slice(size - 4, size)):
        for cols in (slice(0, 4), slice(size - 4, size)):
            pixels[rows, cols] = 255
    return pixels


@pytest.mark.parametrize("mode", ["center", "squash", "border"])
def test_eval_view_at_crop_pct_1_keeps_the_border(mode: str) -> None:
    preprocessing = replace(PREPROCESSING, crop_pct=1.0, crop_mode=mode)
    out = build_eval_transform(preprocessing)(image=_corner_marks(64))["image"]
    red = out[0] * PREPROCESSING.std[0] + PREPROCESSING.mean[0]
    assert min(red[0, 0], red[0, -1], red[-1, 0], red[-1, -1]) > 0.9
    # timm's default crop loses the marks.
    cropped = build_eval_transform(replace(preprocessing, crop_pct=0.875))(image=_corner_marks(64))
    red = cropped["image"][0] * PREPROCESSING.std[0] + PREPROCESSING.mean[0]
    assert red.max() < 0.6


def test_border_mode_pads_a_wide_image_with_the_mean_colour() -> None:
    preprocessing = replace(PREPROCESSING, crop_pct=1.0, crop_mode="border")
    pixels = np.full((16, 64, 3), 255, dtype=np.uint8)
    out = build_eval_transform(preprocessing)(image=pixels)["image"]  # 64x16 → 32x8 + padding
    assert out.shape == (3, 32, 32)
    np.testing.assert_allclose(out[:, :12], 0.0, atol=0.02)  # the mean, normalised
    assert out[:, 12:20].min() > 1.0  # white, normalised


def test_squash_mode_keeps_all_of_a_wide_image() -> None:
    preprocessing = replace(PREPROCESSING, crop_pct=1.0, crop_mode="squash")
    pixels = np.zeros((32, 128, 3), dtype=np.uint8)
    pixels[:, :8, 0] = 255  # a red left edge, which the centre mode crops away
    out = build_eval_transform(preprocessing)(image=pixels)["image"]
    assert out[0, :, 0].mean() > out[0, :, 16].mean() + 1.0
    centre = build_eval_transform(replace(preprocessing, crop_mode="center"))(image=pixels)
    np.testing.assert_allclose(centre["image"][0, :, 0], centre["image"][0, :, 16])


def test_a_large_png_and_its_jpeg_twin_give_nearly_the_same_input(tmp_path: Path) -> None:
    # Fine stripes alias when a large image is point-sampled down; averaged, they are grey.
    preprocessing = replace(PREPROCESSING, input_size=(224, 224), crop_pct=1.0)
    x = np.arange(2048)
    stripes = np.where((x[None, :] + x[:, None]) % 3 == 0, 255, 0).astype(np.uint8)
    rgb = np.repeat(stripes[:, :, None], 3, axis=2)
    Image.fromarray(rgb).save(tmp_path / "big.png")
    Image.fromarray(rgb).save(tmp_path / "big.jpg", quality=95)
    transform = build_eval_transform(preprocessing)
    decode_size = eval_decode_size(preprocessing)
    png, jpeg = (
        transform(image=decode_rgb(tmp_path / name, draft_size=decode_size))["image"]
        for name in ("big.png", "big.jpg")
    )
    assert np.abs(png - jpeg).mean() < 0.1
    # A single bicubic resize of the PNG (no averaging) is far from the JPEG's input.
    pointwise = cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_CUBIC)
    pointwise = (pointwise / 255.0 - PREPROCESSING.mean[0]) / PREPROCESSING.std[0]
    assert np.abs(pointwise.transpose(2, 0, 1) - jpeg).mean() > 0.5


def test_train_transform_without_random_crop_is_the_eval_view_up_to_symmetries() -> None:
    preprocessing = replace(PREPROCESSING, crop_pct=1.0)
    augmentation = replace(AUGMENTATION, random_crop=False, hflip=0.5, vflip=0.5, rotate90=True,
                           color_jitter=0.0)  # fmt: skip
    transform = build_train_transform(preprocessing, augmentation)
    pixels = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    view = build_eval_transform(preprocessing)(image=pixels)["image"]
    symmetries = [np.rot90(v, k, axes=(1, 2)) for v in (view, view[:, :, ::-1]) for k in range(4)]
    seen = set()
    for _ in range(64):
        out = transform(image=pixels)["image"]
        matches = [i for i, s in enumerate(symmetries) if np.allclose(out, s, atol=1e-5)]
        assert matches
        seen.add(matches[0])
    assert len(seen) == 8


def test_train_transform_can_train_smaller_than_it_evaluates() -> None:
    transform = build_train_transform(PREPROCESSING, AUGMENTATION, input_size=(16, 16))
    pixels = np.zeros((40, 40, 3), dtype=np.uint8)
    assert transform(image=pixels)["image"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="square"):
        build_train_transform(
            PREPROCESSING, replace(AUGMENTATION, rotate90=True), input_size=(16, 24)
        )


def test_eval_loader_workers_start_without_a_random_pipeline_to_seed(tmp_path: Path) -> None:
    paths = [
        write_image(tmp_path / c / f"{i}.png", colour=(i * 40, 0, 0)) for c in "ab" for i in (1, 2)
    ]
    images = load_labelled_images(tmp_path)
    dataset = ImageDataset(images, build_eval_transform(PREPROCESSING))
    loader = DataLoader(dataset, batch_size=2, num_workers=2, worker_init_fn=seed_worker_transforms)
    batches = torch.cat([batch[0] for batch in loader])
    assert batches.shape == (len(paths), 3, 32, 32)
    expected = [dataset[i][0] for i in range(len(paths))]
    assert all(torch.equal(got, want) for got, want in zip(batches, expected, strict=True))


def test_eval_transform_keeps_the_centre() -> None:
    # Left and right thirds red, centre green: the centre crop sees only green.
    pixels = np.zeros((64, 192, 3), dtype=np.uint8)
    pixels[:, :64, 0] = pixels[:, 128:, 0] = 255
    pixels[:, 64:128, 1] = 255
    out = build_eval_transform(PREPROCESSING)(image=pixels)["image"]
    red = out[0] * PREPROCESSING.std[0] + PREPROCESSING.mean[0]
    assert red.max() < 0.05


def test_train_transform_is_random_but_seedable() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    transform = build_train_transform(PREPROCESSING, AUGMENTATION)
    transform.set_random_seed(3)
    first = [transform(image=pixels)["image"] for _ in range(3)]
    transform.set_random_seed(3)
    second = [transform(image=pixels)["image"] for _ in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[0], first[1])


def test_each_dataloader_worker_draws_its_own_augmentations(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a" / "0.png", size=(64, 64))
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        path
    )
    images = LabelledImages((path,) * 8, (0,) * 8, ("a",))
    transform = build_train_transform(PREPROCESSING, AUGMENTATION)
    transform.set_random_seed(0)
    dataset = ImageDataset(images, transform)
    # batch_size 4 and 2 workers: worker 0 yields batch 0, worker 1 yields batch 1.
    loader = DataLoader(dataset, batch_size=4, num_workers=2, worker_init_fn=seed_worker_transforms)
    torch.manual_seed(0)
    first, second = (batch[0] for batch in loader)
    assert not torch.equal(first, second)
    # Without the worker seeding both workers repeat the parent's random stream.
    unseeded = DataLoader(dataset, batch_size=4, num_workers=2)
    first, second = (batch[0] for batch in unseeded)
    assert torch.equal(first, second)


def test_whitespace_label_file_without_header_and_a_label_map(tmp_path: Path) -> None:
    # The layout of ELPV's labels.csv: path, defect probability, cell type; no header.
    for name in ("cell0001.png", "cell0002.png", "cell0003.png", "cell0004.png"):
        write_image(tmp_path / "images" / name)
    (tmp_path / "labels.csv").write_text(
        "images/cell0001.png  1.0                 mono\n"
        "images/cell0002.png  0.3333333333333333  poly\n"
        "\n"
        "images/cell0003.png  0.0                 mono\n"
        "images/cell0004.png  1                   poly\n"
    )
    label_format = LabelFileFormat(
        separator="whitespace", header=False, path_column="0", label_column="1",
        label_map=(("0.0", "functional"), ("0.333333", "mild"), ("1.0", "defective")),
    )  # fmt: skip
    with pytest.raises(DatasetError, match=r"label\(s\) \['0.3333333333333333'\]"):
        load_labelled_images(tmp_path / "labels.csv", label_format)
    label_format = LabelFileFormat(
        separator="whitespace", header=False, path_column="0", label_column="1",
        label_map=(("0", "functional"), ("0.3333333333333333", "mild"), ("1", "defective")),
    )  # fmt: skip
    images = load_labelled_images(tmp_path / "labels.csv", label_format)
    assert images.classes == ("functional", "mild", "defective")  # the map's order
    assert images.labels == (2, 1, 0, 2)
    assert [p.name for p in images.paths] == [f"cell000{i}.png" for i in range(1, 5)]
    with pytest.raises(DatasetError, match="0-based column"):
        load_labelled_images(
            tmp_path / "labels.csv", LabelFileFormat(separator="whitespace", header=False)
        )


def test_eval_transform_of_an_extremely_elongated_image_stays_small() -> None:
    pixels = np.full((1, 40_000, 3), 200, dtype=np.uint8)
    out = build_eval_transform(PREPROCESSING)(image=pixels)["image"]
    assert out.shape == (3, 32, 32)
    # One colour stays that colour, however the row was cropped and stretched.
    mean, std = (np.array(v)[:, None, None] for v in (PREPROCESSING.mean, PREPROCESSING.std))
    np.testing.assert_allclose(out, np.broadcast_to((200 / 255 - mean) / std, out.shape), atol=1e-5)


@pytest.mark.parametrize("fmt, shrinks", [("JPEG", True), ("PNG", False)])
def test_eval_decode_shrinks_big_jpegs_but_never_below_the_crop(
    tmp_path: Path, fmt: str, shrinks: bool
) -> None:
    preprocessing = Preprocessing(
        input_size=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic",
        crop_pct=0.875,
    )  # fmt: skip
    side, _ = eval_decode_size(preprocessing)
    assert side * preprocessing.crop_pct >= 224
    path = tmp_path / f"big.{fmt.lower()}"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (1500, 2000, 3), dtype=np.uint8)).save(path, fmt)

    decoded = decode_rgb(path, draft_size=eval_decode_size(preprocessing))
    height, width = decoded.shape[:2]
    if shrinks:  # 1/4 scale: the largest reduction that keeps both sides ≥ 256
        assert (width, height) == (500, 375)
    else:
        assert (width, height) == (2000, 1500)
    assert build_eval_transform(preprocessing)(image=decoded)["image"].shape == (3, 224, 224)
