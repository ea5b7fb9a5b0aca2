"""``convtune check-data`` and the check behind it: bad files, duplicates, too-small classes."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import HEAVY_MODULES, huge_canvas_png, loaded_after
from PIL import Image

from convtune.benchmarks.cli import main as bench_main
from convtune.benchmarks.hostile_images import rle_bmp
from convtune.data.checks import (
    ACROSS_CLASSES,
    ACROSS_PARTS,
    WITHIN_CLASS,
    check_dataset,
    inspect_file,
    print_check,
)
from convtune.data.datasets import DatasetError, load_labelled_images
from convtune.data.splits import stratified_split
from convtune.data.synthetic import draw_shape, write_class_folders
from convtune.training.cli import main

CLASSES = ("circle", "square")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Two classes of 4 distinct 32-pixel PNGs each."""
    return write_class_folders(
        tmp_path / "data", CLASSES, lambda name, rng: draw_shape(name, rng, 32),
        per_class=4, seed=0,
    )  # fmt: skip


def write_image(path: Path, image_format: str, seed: int = 0) -> bytes:
    draw_shape("circle", np.random.default_rng(seed), 48).save(path, format=image_format)
    return path.read_bytes()


def test_bad_files_are_found_with_their_reasons(tmp_path: Path) -> None:
    png = write_image(tmp_path / "whole.png", "PNG")
    jpeg = write_image(tmp_path / "whole.jpg", "JPEG")
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) - 100])
    idat = png.index(b"IDAT") + 8  # a byte inside the compressed pixels
    (tmp_path / "flipped.png").write_bytes(png[:idat] + bytes([png[idat] ^ 1]) + png[idat + 1 :])
    (tmp_path / "notes.png").write_text("not an image, despite the name\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "huge.png").write_bytes(huge_canvas_png())  # 8000x8000 declared, 45 bytes
    # Data after the end of the image is not damage: cameras pad files, MPO appends frames.
    (tmp_path / "padded.jpg").write_bytes(jpeg + b"\0" * 64 + b"trailer")
    (tmp_path / "padded.png").write_bytes(png + b"\0" * 16)
    (tmp_path / "rle.bmp").write_bytes(rle_bmp())  # refused by decode_rgb's rules too

    def problem(name: str) -> str | None:
        return inspect_file(tmp_path / name).problem

    assert problem("whole.png") is None and problem("whole.jpg") is None
    assert problem("padded.png") is None and problem("padded.jpg") is None
    assert problem("cut.png") == "is truncated: its PNG IDAT chunk runs past the end of the file"
    assert problem("cut.jpg") == (
        "is truncated: the JPEG has no end-of-image marker after its last scan"
    )
    assert problem("flipped.png") == "is damaged: its PNG IDAT chunk fails its CRC check"
    assert problem("notes.png").startswith("is not an image in a supported format (JPEG, PNG")
    assert problem("empty.jpg") == "is empty (0 bytes)"
    assert problem("huge.png") == "is 8000x8000, more than 40,000,000 pixels"
    assert problem("rle.bmp").startswith("is a BMP with RLE8 compression, which is refused")
    facts = inspect_file(tmp_path / "whole.png")
    assert (facts.size, facts.mode, facts.format) == ((48, 48), "RGB", "PNG")


def test_a_png_without_its_end_chunk_is_truncated(tmp_path: Path) -> None:
    png = write_image(tmp_path / "whole.png", "PNG")
    (tmp_path / "no_end.png").write_bytes(png[:-12])  # IEND is the last 12 bytes
    assert inspect_file(tmp_path / "no_end.png").problem == (
        "is truncated: the PNG ends before its IEND chunk"
    )


def test_bad_files_stop_training_unless_skipped(dataset: Path) -> None:
    bad = dataset / "square" / "0001.png"
    bad.write_bytes(bad.read_bytes()[:100])
    check = check_dataset(load_labelled_images(dataset))
    assert [(b.path, b.reason) for b in check.bad_files] == [
        (bad, "is truncated: its PNG IDAT chunk runs past the end of the file")
    ]
    (problem,) = check.problems(skip_bad_images=False, allow_duplicates=False)
    assert problem.startswith(f"1 image file(s) cannot be used: {bad} is truncated")
    assert problem.endswith("or pass --skip-bad-images to train without them")
    assert check.problems(skip_bad_images=True, allow_duplicates=False) == []
    assert check.counts == {"all": {"circle": 4, "square": 4}}  # listed, bad or not


def test_copies_are_found_and_classified(dataset: Path) -> None:
    shutil.copy(dataset / "circle" / "0000.png", dataset / "circle" / "copy.png")
    shutil.copy(dataset / "circle" / "0001.png", dataset / "square" / "relabelled.png")
    images = load_labelled_images(dataset)
    index = {path.name + path.parent.name: i for i, path in enumerate(images.paths)}
    check = check_dataset(images)
    assert check.duplicates(WITHIN_CLASS) == [(index["0000.pngcircle"], index["copy.pngcircle"])]
    assert check.duplicates(ACROSS_CLASSES) == [
        (index["0001.pngcircle"], index["relabelled.pngsquare"])
    ]
    assert check.duplicates(ACROSS_PARTS) == []
    assert check.digests[index["0000.pngcircle"]] == check.digests[index["copy.pngcircle"]]
    assert len({check.digests[i] for i in range(len(images))}) == len(images) - 2
    (conflict,) = check.problems(skip_bad_images=False, allow_duplicates=False)
    assert conflict == (
        "1 image(s) have exact copies in another class (conflicting labels), e.g. "
        f"{dataset}/circle/0001.png (circle) = {dataset}/square/relabelled.png (square). "
        "Remove or relabel them, or pass --allow-duplicates"
    )
    assert check.problems(skip_bad_images=False, allow_duplicates=True) == []
    (warning,) = check.warnings()
    assert warning.startswith(
        f"1 image(s) are exact copies of another in the same class and split, e.g. "
        f"{dataset}/circle/0000.png = {dataset}/circle/copy.png"
    )


def test_a_copy_across_splits_is_leakage(dataset: Path) -> None:
    shutil.copy(dataset / "square" / "0002.png", dataset / "square" / "again.png")
    images = load_labelled_images(dataset)
    again = images.paths.index(dataset / "square" / "again.png")
    original = images.paths.index(dataset / "square" / "0002.png")
    rest = [i for i in range(len(images)) if i not in (again, original)]
    check = check_dataset(images, {"train": [original, *rest[2:]], "val": [again, *rest[:2]]})
    assert check.duplicates(ACROSS_PARTS) == [tuple(sorted((original, again)))]
    assert check.duplicates(ACROSS_CLASSES) == check.duplicates(WITHIN_CLASS) == []
    assert check.counts["val"] == {"circle": 2, "square": 1}
    (leak,) = check.problems(skip_bad_images=False, allow_duplicates=False)
    assert leak.startswith("1 image(s) have exact copies in another split (leakage), e.g. ")
    assert f"{dataset}/square/0002.png (train) = {dataset}/square/again.png (val)" in leak
    assert check.problems(skip_bad_images=False, allow_duplicates=True) == []
    assert check.warnings() == []
    table = io.StringIO()
    print_check(check, table)
    rows = [
        [cell.strip() for cell in line.split("│")[1:-1]] for line in table.getvalue().splitlines()
    ]
    assert ["class", "train", "val", "total"] in [
        [cell.strip() for cell in line.split("┃")[1:-1]] for line in table.getvalue().splitlines()
    ]
    assert ["square", "4", "1", "5"] in rows and ["copies across splits", "1", "1", "2"] in rows


def test_parts_must_hold_each_image_once(dataset: Path) -> None:
    images = load_labelled_images(dataset)
    with pytest.raises(ValueError, match="image 0 is in both the train and val parts"):
        check_dataset(images, {"train": range(len(images)), "val": [0]})
    with pytest.raises(ValueError, match=r"image 7 is in none of the parts \['train'\]"):
        check_dataset(images, {"train": range(7)})


def test_too_small_classes_are_named_with_the_fix() -> None:
    labels = [0] * 100 + [1] * 2 + [2]
    classes = ("common", "rare", "rarer")
    with pytest.raises(DatasetError) as both:
        stratified_split(labels, classes, val_fraction=0.2, test_fraction=0.25)
    assert str(both.value) == (
        "class(es) with too few distinct images to split with --val-fraction 0.2 and "
        "--test-fraction 0.25: 'rare' has 2 (needs 3), 'rarer' has 1 (needs 3). Add images to "
        "them, lower --val-fraction/--test-fraction, or drop or merge the class"
    )
    with pytest.raises(DatasetError) as val_only:
        stratified_split(labels, classes, val_fraction=0.2)
    assert str(val_only.value) == (
        "class(es) with too few distinct images to split with --val-fraction 0.2: 'rarer' has "
        "1 (needs 2). Add images to them, lower --val-fraction, or drop or merge the class"
    )


def test_check_data_prints_one_table(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (dataset / "circle" / "notes.png").write_text("hello")
    assert main(["check-data", str(dataset), "--skip-bad-images"]) == 0
    out, err = capsys.readouterr()
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines()
            if line.count("│") == 3}  # fmt: skip
    assert rows["circle"] == "5" and rows["square"] == "4" and rows["all classes"] == "9"
    assert rows["unreadable"] == "1" and rows["copies within a class"] == "0"
    assert out.splitlines()[-4:] == [
        f"unreadable: {dataset}/circle/notes.png is not an image in a supported format "
        "(JPEG, PNG, WEBP, BMP, GIF, TIFF)",
        "sizes: 32×32 (8)",
        "modes: RGB (8)",
        "formats: PNG (8)",
    ]
    assert err == f"data: class folders {dataset}/<class>/<image>\n"


def test_check_data_fails_when_fit_would_refuse(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (dataset / "square" / "0003.png").write_bytes(b"")
    shutil.copy(dataset / "square" / "0000.png", dataset / "circle" / "0000.png")
    assert main(["check-data", str(dataset), "--format", "json", "--test-fraction", "0.3"]) == 1
    out, err = capsys.readouterr()
    found = json.loads(out)
    assert found["counts"] == {"all": {"circle": 4, "square": 4}}
    assert found["bad_files"] == [
        {"path": str(dataset / "square" / "0003.png"), "reason": "is empty (0 bytes)"}
    ]
    assert [d["kinds"] for d in found["duplicates"]] == [[ACROSS_CLASSES]]
    assert found["sizes"]["most_common"] == [{"width": 32, "height": 32, "images": 7}]
    layout, *lines = err.splitlines()
    assert layout == f"data: {found['layout']}"
    assert lines == [f"convtune check-data: error: {problem}" for problem in found["problems"]]
    assert found["problems"][0].startswith("1 image file(s) cannot be used: ")
    assert found["problems"][1].startswith("1 image(s) have exact copies in another class")
    # Allowed and skipped, the data passes: 4 images a class split 0.2/0.3 as 1/1/2.
    argv = ["check-data", str(dataset), "--skip-bad-images", "--allow-duplicates"]
    assert main([*argv, "--test-fraction", "0.3"]) == 0
    assert main([*argv, "--val-fraction", "0.5", "--test-fraction", "0.4"]) == 1
    # Unreadable files and copies do not count: 4 distinct circles and 3 squares remain.
    assert "'circle' has 4 (needs 5), 'square' has 3 (needs 5)" in capsys.readouterr().err


def test_check_data_usage_errors_exit_2(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-data", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == (
        f"convtune check-data: error: {tmp_path / 'nowhere'} does not exist\n"
    )
    argv = ["check-data", str(dataset), "--val-fraction", "0.5", "--test-fraction", "0.5"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "convtune check-data: error: invalid setting(s): test_fraction=0.5\n"
    )


def test_check_data_loads_no_training_stack(dataset: Path) -> None:
    heavy = (*HEAVY_MODULES, "onnxruntime")
    status, loaded, answer = loaded_after(["check-data", str(dataset), "--format", "json"], heavy)
    assert (status, loaded) == (0, [])
    assert json.loads(answer)["images"] == 8


def test_bench_check_data_compares_the_check_with_a_full_decode(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "report.json"
    argv = ["check-data", "--images", str(dataset), "--rounds", "2", "--workers", "1,2"]
    assert bench_main([*argv, "--json", str(report)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"8 images from {dataset}; file cache warm; CPU flags: ")
    assert [line[:36].strip() for line in lines[2:5]] == [
        "check_dataset, 1 worker(s)",
        "check_dataset, 2 worker(s)",
        "full decode (decode_rgb), baseline",
    ]
    found = json.loads(report.read_text())
    assert len(found["rounds"]) == 2 and isinstance(found["machine"]["cpu_flags"], list)
    median = found["median"]
    assert median["check_vs_decode"] > 0 and median["decode"] > 0


def test_check_data_reads_a_pre_split_tree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def draw(name: str, rng: np.random.Generator) -> Image.Image:
        return draw_shape(name, rng, 32)

    train = write_class_folders(tmp_path / "train", CLASSES, draw, per_class=2, seed=0)
    val = write_class_folders(tmp_path / "val", CLASSES, draw, per_class=2, seed=1)
    (train / "square" / "0001.png").unlink()
    shutil.copy(train / "circle" / "0000.png", val / "circle" / "leak.png")
    assert main(["check-data", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines()]
    assert ["circle", "2", "3", "5"] in rows and ["square", "1", "2", "3"] in rows
    assert ["copies across splits", "1", "1", "2"] in rows
    (error,) = [line for line in err.splitlines() if "error" in line]
    assert error == (
        "convtune check-data: error: 1 image(s) have exact copies in another split (leakage), "
        f"e.g. {train}/circle/0000.png (train) = {val}/circle/leak.png (val). Remove the "
        "copies, or pass --allow-duplicates"
    )
    # The val part is given; a test part carved out of train needs 2 distinct per class.
    assert main(["check-data", str(tmp_path), "--allow-duplicates"]) == 0
    assert main(["check-data", str(tmp_path), "--allow-duplicates", "--test-fraction", "0.5"]) == 1
    assert capsys.readouterr().err.endswith(
        "convtune check-data: error: class(es) with too few distinct images to split with "
        "--test-fraction 0.5: 'square' has 1 (needs 2). Add images to them, lower "
        "--test-fraction, or drop or merge the class\n"
    )
