"""Test-time views: the view sets, their temperatures, and predict/evaluate averaging them.

The suite's trained run (tests/conftest.py) is fitted with ``--tta d4``, so its artifact
carries a temperature for the single view and one for the 8 views.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from convtune.data.datasets import load_labelled_images
from convtune.data.images import decode_rgb
from convtune.models.artifact import read_manifest
from convtune.models.inference import OnnxClassifier, image_views, softmax, view_probabilities
from convtune.training.cli import main


def distinct(arrays: list[np.ndarray]) -> set[bytes]:
    return {np.ascontiguousarray(a).tobytes() for a in arrays}


def test_d4_gives_the_eight_symmetries_of_the_square() -> None:
    # No two pixels alike, so no symmetry of the square maps the batch onto itself.
    pixels = np.arange(2 * 3 * 5 * 5, dtype=np.float32).reshape(2, 3, 5, 5)
    views = image_views(pixels, "d4")
    assert len(views) == 8 and len(distinct(views)) == 8
    assert np.array_equal(views[0], pixels)
    for turns, view in enumerate(views[:4]):  # quarter turns counterclockwise
        assert np.array_equal(np.rot90(view, -turns, axes=(2, 3)), pixels)
    for turns, view in enumerate(views[4:]):  # mirrored left-right, then turned
        assert np.array_equal(np.rot90(view, -turns, axes=(2, 3))[..., ::-1], pixels)
    # A group: the views of any view are the same 8 arrays, and each moves pixels only
    # within its own image and channel.
    for view in views:
        assert distinct(image_views(view, "d4")) == distinct(views)
        assert np.array_equal(np.sort(view.reshape(6, 25)), np.sort(pixels.reshape(6, 25)))


def test_flip_is_the_identity_and_the_mirror_and_none_is_the_batch() -> None:
    pixels = np.random.default_rng(0).normal(size=(3, 3, 4, 6)).astype(np.float32)
    identity, mirrored = image_views(pixels, "flip")
    assert np.array_equal(identity, pixels)
    assert np.array_equal(mirrored[..., ::-1], pixels) and not np.array_equal(mirrored, pixels)
    assert distinct(image_views(pixels[..., :4], "flip")) < distinct(
        image_views(pixels[..., :4], "d4")
    )
    [only] = image_views(pixels, "none")
    assert np.array_equal(only, pixels)


def test_view_sets_are_checked() -> None:
    with pytest.raises(ValueError, match="needs a square input; the input is 4x6"):
        image_views(np.zeros((1, 3, 4, 6), np.float32), "d4")
    with pytest.raises(ValueError, match="unknown view set 'd8'"):
        image_views(np.zeros((1, 3, 4, 4), np.float32), "d8")


def test_view_probabilities_is_the_mean_of_the_views_calibrated_softmax() -> None:
    logits = np.array([[[2.0, 0.0]], [[0.0, 2.0]], [[4.0, 0.0]]])  # 3 views of 1 image
    expected = (softmax(logits[0], 2.0) + softmax(logits[1], 2.0) + softmax(logits[2], 2.0)) / 3
    np.testing.assert_allclose(view_probabilities(logits, 2.0), expected, rtol=1e-12)
    np.testing.assert_allclose(view_probabilities(logits[0], 2.0), softmax(logits[0], 2.0))


def scores_on_test_part(run_dir: Path, classifier: OnnxClassifier) -> tuple[float, float]:
    """Accuracy and mean negative log-likelihood of ``classifier`` on the run's test part."""
    test_part = json.loads((run_dir / "split.json").read_text())["test"]
    probabilities = classifier.classify([decode_rgb(path) for path, _ in test_part])
    labels = np.array([classifier.classes.index(label) for _, label in test_part])
    truth = probabilities[np.arange(len(labels)), labels]
    return float(np.mean(probabilities.argmax(axis=1) == labels)), float(-np.log(truth).mean())


def test_fit_reports_the_single_view_and_the_views_side_by_side(
    trained_run: Path, artifact_dir: Path
) -> None:
    description = json.loads((trained_run / "model.json").read_text())
    temperatures = description["temperatures"]
    assert set(temperatures) == {"none", "d4"}
    assert description["temperature"] == temperatures["none"]
    assert description["val_metrics"]["tta"]["temperature"] == temperatures["d4"]
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["temperature"] == temperatures["none"]  # the headline stays single-view
    tta = metrics["tta"]
    assert set(tta) == {"views", "accuracy", "macro_f1", "nll", "ece", "temperature"}
    assert tta["views"] == "d4" and tta["temperature"] == temperatures["d4"]
    # Each column is what the exported model answers over the run's test part.
    for views, reported in (("none", metrics), ("d4", tta)):
        accuracy, nll = scores_on_test_part(trained_run, OnnxClassifier(artifact_dir, tta=views))
        assert reported["accuracy"] == pytest.approx(accuracy, abs=1e-9), views
        assert reported["nll"] == pytest.approx(nll, abs=1e-5), views
    report = (trained_run / "report.html").read_text()
    assert "<th>single view</th><th>mean of the d4 views</th>" in report
    manifest = read_manifest(artifact_dir)
    assert manifest.temperatures == temperatures
    written = json.loads((artifact_dir / "manifest.json").read_text())
    assert written["temperatures"] == temperatures
    assert written["serving"] == {"tta": "none"} and manifest.serving_tta == "none"


def test_an_artifact_from_before_test_time_views_still_reads(artifact_dir, tmp_path) -> None:
    copy = shutil.copytree(artifact_dir, tmp_path / "artifact")
    raw = json.loads((copy / "manifest.json").read_text())
    del raw["temperatures"], raw["serving"]
    (copy / "manifest.json").write_text(json.dumps(raw))
    manifest = read_manifest(copy)
    assert manifest.temperatures == {"none": raw["temperature"]}
    assert manifest.serving_tta == "none"


def predict_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[np.ndarray, str]:
    """``convtune predict ... --top-k 99``: the probabilities (rows) and stderr."""
    assert main(["predict", *args, "--top-k", "99"]) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)["results"]
    return np.array([list(r["probabilities"].values()) for r in results]), captured.err


def test_predict_d4_is_the_mean_over_the_eight_turned_copies(
    artifact_dir, heldout_shapes_dir, capsys
) -> None:
    files = sorted(heldout_shapes_dir.glob("*/000[0-1].png"))
    answer, err = predict_cli(capsys, str(artifact_dir), *map(str, files), "--tta", "d4")
    assert "temperature" not in err  # the run fitted one for d4
    single, _ = predict_cli(capsys, str(artifact_dir), *map(str, files))
    classifier = OnnxClassifier(artifact_dir)
    temperature = read_manifest(artifact_dir).temperatures["d4"]
    for row, file in zip(answer, files, strict=True):
        pixels = classifier.preprocess(decode_rgb(file))  # (3, H, W)
        copies = [
            np.rot90(pixels[:, :, ::-1] if mirrored else pixels, turns, axes=(1, 2))
            for turns, mirrored in itertools.product(range(4), (False, True))
        ]
        each = [softmax(classifier.logits(np.ascontiguousarray(c)[None]), temperature)[0]
                for c in copies]  # fmt: skip
        np.testing.assert_allclose(row, np.mean(each, axis=0), atol=1e-5)
    assert np.abs(answer - single).max() > 1e-4  # the views change the answer


def test_predict_without_a_fitted_temperature_uses_the_single_views_and_says_so(
    artifact_dir, heldout_shapes_dir, capsys
) -> None:
    [file] = sorted(heldout_shapes_dir.glob("square/0000.png"))
    [row], err = predict_cli(capsys, str(artifact_dir), str(file), "--tta", "flip")
    assert "no temperature fitted for flip views" in err
    classifier = OnnxClassifier(artifact_dir)
    pixels = classifier.preprocess(decode_rgb(file))[None]
    temperature = read_manifest(artifact_dir).temperature
    expected = (
        softmax(classifier.logits(pixels), temperature)
        + softmax(classifier.logits(np.ascontiguousarray(pixels[..., ::-1])), temperature)
    ) / 2
    np.testing.assert_allclose(row, expected[0], atol=1e-5)


def test_evaluate_with_views_scores_what_predict_with_them_answers(
    artifact_dir, heldout_shapes_dir, tmp_path, capsys
) -> None:
    args = ["evaluate", str(artifact_dir), "--data", str(heldout_shapes_dir), "--tta", "d4",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["views"] == "d4"
    assert report["temperature"] == read_manifest(artifact_dir).temperatures["d4"]
    images = load_labelled_images(heldout_shapes_dir)
    classifier = OnnxClassifier(artifact_dir, tta="d4")
    predicted = classifier.classify([decode_rgb(p) for p in images.paths]).argmax(axis=1)
    labels = [classifier.classes.index(images.classes[label]) for label in images.labels]
    assert report["accuracy"] == pytest.approx(np.mean(predicted == labels), abs=1e-9)
    assert json.loads((tmp_path / "metrics.json").read_text())["views"] == "d4"


def test_export_checks_the_view_set_it_is_to_serve(caplog: pytest.LogCaptureFixture) -> None:
    from convtune.training.export import check_serving_views

    temperatures = {"none": 1.5, "d4": 1.2}
    check_serving_views("d4", temperatures=temperatures, input_size=(40, 40))
    assert "no temperature" not in caplog.text
    with pytest.raises(ValueError, match="square"):
        check_serving_views("d4", temperatures=temperatures, input_size=(40, 48))
    check_serving_views("flip", temperatures=temperatures, input_size=(40, 48))
    assert "no temperature fitted for flip views" in caplog.text
