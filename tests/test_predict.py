"""``convtune predict`` at scale: its inputs (files, folders, globs, label files), its
batched and streamed answers in each format, error rows, and a start without torch."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import loaded_after

from convtune.data.synthetic import draw_shape
from convtune.models.inference import OnnxClassifier
from convtune.training.cli import main
from convtune.training.predict import ImageInput, collect_inputs

CLASSES = ("circle", "square", "triangle")


def test_predict_loads_none_of_the_training_stack(artifact_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "square.png"
    draw_shape("square", np.random.default_rng(0)).save(image)
    status, loaded, answer = loaded_after(["predict", str(artifact_dir), str(image)])
    assert status == 0 and loaded == []
    assert json.loads(answer)["results"][0]["image"] == str(image)


def test_evaluate_loads_none_of_the_training_stack(
    artifact_dir: Path, heldout_shapes_dir: Path
) -> None:
    status, loaded, answer = loaded_after(
        ["evaluate", str(artifact_dir), "--data", str(heldout_shapes_dir)]
    )
    assert status == 0 and loaded == []
    assert json.loads(answer)["n"] == 45


def write_images(folder: Path, names: list[str], seed: int = 0) -> list[Path]:
    """A PNG of a shape at each relative path in ``names``, the shape its first folder's
    name where that is a shape (else a circle)."""
    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = path.parent.name if path.parent.name in CLASSES else "circle"
        draw_shape(shape, rng, 48).save(path)
        paths.append(path)
    return paths


def test_a_folder_is_searched_recursively_and_labelled_by_its_class_folders(
    tmp_path: Path,
) -> None:
    write_images(tmp_path, ["square/b.png", "circle/a.png", "circle/deep/c.png"])
    write_images(tmp_path, ["circle/.hidden.png", ".cache/x.png", "square/notes.txt.png"])
    (tmp_path / "circle" / "readme.txt").write_text("not an image")
    found = collect_inputs([tmp_path], classes=CLASSES)
    assert [(image.path.relative_to(tmp_path).as_posix(), image.label) for image in found] == [
        ("circle/a.png", "circle"),
        ("circle/deep/c.png", "circle"),
        ("square/b.png", "square"),
        ("square/notes.txt.png", "square"),
    ]
    # Sub-folders that are not all classes of the model give no labels.
    assert {image.label for image in collect_inputs([tmp_path], classes=("circle",))} == {None}


def test_globs_label_files_and_repeats(tmp_path: Path) -> None:
    a, b, c = write_images(tmp_path, ["one/a.png", "two/b.png", "two/deeper/c.png"])
    metadata = tmp_path / "metadata.csv"  # Hugging Face imagefolder's columns
    metadata.write_text("file_name,label\ntwo/b.png,square\none/a.png,dog\n")
    listing = tmp_path / "list.tsv"  # no label column: a plain list of images
    listing.write_text("path\ttaken\ntwo/deeper/c.png\tyesterday\n")
    found = collect_inputs(
        [str(metadata), str(tmp_path / "**" / "*.png"), str(listing), str(b)], classes=CLASSES
    )
    assert found == [
        ImageInput(b.resolve(), "square"),
        ImageInput(a.resolve(), "dog"),
        ImageInput(c),  # the glob's match: not listed before, under another name
    ]


def test_a_path_that_matches_nothing_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing\.png does not exist"):
        collect_inputs([tmp_path / "missing.png"], classes=CLASSES)
    with pytest.raises(FileNotFoundError, match=r"\*\.jpg matches no image files"):
        collect_inputs([str(tmp_path / "*.jpg")], classes=CLASSES)
    with pytest.raises(FileNotFoundError, match="empty holds no images"):
        collect_inputs([tmp_path / "empty"], classes=CLASSES)
    bad_list = tmp_path / "list.csv"
    bad_list.write_text("filename,class\na.png,circle\n")
    with pytest.raises(ValueError, match=r"list\.csv has no path or file_name column"):
        collect_inputs([bad_list], classes=CLASSES)


def run_predict(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, str, str]:
    status = main(["predict", *arguments])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture()
def folder_with_a_bad_file(heldout_shapes_dir: Path, tmp_path: Path) -> Path:
    """Three class folders of heldout images, one PNG in the square folder truncated."""
    folder = tmp_path / "images"
    for image in sorted(heldout_shapes_dir.glob("*/000[0-3].png")):
        target = folder / image.parent.name / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
    truncated = folder / "square" / "0002.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    return folder


def test_a_bad_file_gets_an_error_row_and_the_others_are_answered(
    artifact_dir: Path, folder_with_a_bad_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_predict(
        capsys, str(artifact_dir), str(folder_with_a_bad_file), "--batch-size", "5"
    )
    results = json.loads(out)["results"]
    assert status == 1 and len(results) == 12
    bad = str(folder_with_a_bad_file / "square" / "0002.png")
    [error_row] = [row for row in results if "error" in row]
    assert error_row["image"] == bad and "damaged or truncated" in error_row["error"]
    assert all(set(row["probabilities"]) == set(CLASSES) for row in results if row != error_row)
    assert all(row["true_label"] == Path(row["image"]).parent.name for row in results)
    assert "11 image(s) classified, 1 failed; results on stdout" in err
    assert f"failed: {bad} is damaged or truncated" in err
    correct = sum(row.get("label") == row["true_label"] for row in results)
    assert f"accuracy {correct / 11:.4f} ({correct}/11 labelled images)" in err
    assert f"convtune evaluate {artifact_dir} --data {folder_with_a_bad_file}" in err


def test_jsonl_and_csv_agree_with_json_and_output_writes_a_file(
    artifact_dir: Path, folder_with_a_bad_file: Path, tmp_path: Path, capsys
) -> None:
    arguments = [str(artifact_dir), str(folder_with_a_bad_file), "--top-k", "2"]
    _, out, _ = run_predict(capsys, *arguments)
    expected = json.loads(out)["results"]
    status, out, err = run_predict(capsys, *arguments, "--format", "jsonl")
    assert status == 1 and [json.loads(line) for line in out.splitlines()] == expected
    output = tmp_path / "answers.csv"
    status, out, err = run_predict(capsys, *arguments, "--format", "csv", "--output", str(output))
    assert status == 1 and out == "" and f"results in {output}" in err
    rows = list(csv.DictReader(io.StringIO(output.read_text())))
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected, strict=True):
        assert (row["image"], row["true_label"]) == (want["image"], want["true_label"])
        if "error" in want:
            assert row["error"] == want["error"] and row["label"] == row["probability"] == ""
            continue
        assert row["error"] == "" and row["label"] == want["label"]
        assert float(row["probability"]) == want["probabilities"][want["label"]]
        assert {name: float(row[f"p_{name}"]) for name in CLASSES} == want["probabilities"]
        assert row["top_k"] == ";".join(f"{t['label']}:{t['probability']}" for t in want["top_k"])


def test_batches_answer_as_single_images_do(
    artifact_dir: Path, heldout_shapes_dir: Path, tmp_path: Path, capsys
) -> None:
    files = sorted(heldout_shapes_dir.glob("*/000[0-4].png"))
    listing = tmp_path / "list.csv"
    listing.write_text("path\n" + "".join(f"{file}\n" for file in files))
    _, out, _ = run_predict(capsys, str(artifact_dir), str(listing), "--batch-size", "4")
    batched = [row["probabilities"] for row in json.loads(out)["results"]]
    classifier = OnnxClassifier(artifact_dir)
    single = [classifier.classify([classifier.decode(file)])[0] for file in files]
    assert len(batched) == len(files)
    for answer, alone in zip(batched, single, strict=True):
        np.testing.assert_allclose(list(answer.values()), alone, atol=1e-6, rtol=0)


def test_usage_errors_come_before_any_work(artifact_dir: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "answers.json"
    status, out, err = run_predict(
        capsys, str(artifact_dir), str(tmp_path / "nothing-*.png"), "--output", str(output)
    )
    assert status == 2 and out == "" and not output.exists()
    assert "nothing-*.png matches no image files or folders" in err
    status, _, err = run_predict(capsys, str(artifact_dir), str(tmp_path), "--batch-size", "0")
    assert status == 2 and "--batch-size must be a positive integer" in err


def test_a_classifier_that_does_not_spin_answers_the_same(
    artifact_dir: Path, heldout_shapes_dir: Path
) -> None:
    """The service's sessions (spin_waits=False) sleep while they wait, and their answers
    are the ones a spinning session gives."""
    files = sorted(heldout_shapes_dir.glob("*/000[0-1].png"))
    spinning = OnnxClassifier(artifact_dir, threads=2)
    sleeping = OnnxClassifier(artifact_dir, threads=2, spin_waits=False)
    options = sleeping.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    images = [spinning.decode(file) for file in files]
    np.testing.assert_array_equal(spinning.classify(images), sleeping.classify(images))
