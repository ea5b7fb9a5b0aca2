"""Export: the artifact format, integrity checks, and predict/evaluate on it."""

from __future__ import annotations

import json
import re
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import reference_results
from safetensors.torch import load_file, save_file

from convtune.data.datasets import load_labelled_images
from convtune.data.synthetic import make_shapes_dataset
from convtune.models.artifact import ArtifactError, locate_artifact, read_manifest, sha256_file
from convtune.models.inference import OnnxClassifier, softmax
from convtune.training import export
from convtune.training.cli import main
from convtune.training.export import (
    build_manifest,
    check_onnx_matches,
    load_trained_model,
    write_graph,
)


def test_artifact_is_self_describing(artifact_dir: Path, trained_run: Path) -> None:
    assert sorted(p.name for p in artifact_dir.iterdir()) == [
        "explain.onnx", "manifest.json", "model.onnx", "weights.safetensors",
    ]  # fmt: skip
    read_manifest(artifact_dir)  # verifies
    raw = json.loads((artifact_dir / "manifest.json").read_text())
    assert raw["schema_version"] == 1
    assert raw["architecture"] == "test_resnet"
    assert raw["classes"] == ["circle", "square", "triangle"]
    assert raw["preprocessing"]["input_size"] == [40, 40]
    assert set(raw["metrics"]["val"]) >= {"accuracy", "macro_f1", "nll", "ece"}
    assert raw["temperature"] == raw["metrics"]["val"]["temperature"] > 0
    assert raw["training_config"]["model"] == "test_resnet"
    assert raw["versions"]["torch"] == metadata.version("torch")
    assert set(raw["files"]) == {"explain.onnx", "model.onnx", "weights.safetensors"}
    assert raw["explain"]["graph"] == "explain.onnx"


def test_the_logits_graph_computes_what_the_model_alone_does(
    artifact_dir: Path, trained_run: Path, tmp_path: Path
) -> None:
    # onnxruntime runs every node of a graph whatever a call asks for: what /predict runs
    # must be the model exported alone, node for node; the class maps and stages live in
    # explain.onnx.
    model, _ = load_trained_model(trained_run)
    write_graph(model, torch.randn(2, 3, 40, 40), tmp_path / "alone.onnx", output_names=["logits"])
    alone = onnx.load(tmp_path / "alone.onnx").graph
    logits_only = onnx.load(artifact_dir / "model.onnx").graph
    explaining = onnx.load(artifact_dir / "explain.onnx").graph
    assert [output.name for output in logits_only.output] == ["logits"]
    assert [node.op_type for node in logits_only.node] == [node.op_type for node in alone.node]
    assert [output.name for output in explaining.output] == [
        "logits", "class_maps", *(f"stage_{k}" for k in range(1, 6)),
    ]  # fmt: skip
    assert "Einsum" in {node.op_type for node in explaining.node}


def test_export_command_writes_the_artifact_and_stores_it(
    exported_model: str, trained_run: Path, bentoml_home: Path
) -> None:
    # The suite's model was exported by `convtune export` (tests/conftest.py), which printed
    # the tag of what it stored.
    assert re.fullmatch(r"convtune:[a-z0-9]+", exported_model), exported_model
    name, version = exported_model.split(":")
    stored = bentoml_home / "models" / name / version
    written = trained_run / "artifact"
    for file in ("model.onnx", "explain.onnx", "weights.safetensors", "manifest.json"):
        assert sha256_file(stored / file) == sha256_file(written / file), file
    assert (
        load_file(written / "weights.safetensors").keys()
        == load_file(trained_run / "model.safetensors").keys()
    )


def test_export_is_refused_when_onnx_and_pytorch_disagree(
    trained_run: Path, artifact_dir: Path, bentoml_home: Path, tmp_path: Path, monkeypatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # A run whose weights moved after its graph was made: the graph below is the suite's
    # model's, the weights now give every class a different bias.
    run = shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("artifact"))
    weights = load_file(run / "model.safetensors")
    weights["head.0.bias"] += torch.tensor([0.5, -0.5, 0.0])
    save_file(weights, run / "model.safetensors")

    def export_the_old_graph(model: torch.nn.Module, directory: Path) -> None:
        shutil.copyfile(artifact_dir / "model.onnx", directory / "model.onnx")

    monkeypatch.setattr(export, "export_onnx", export_the_old_graph)
    assert main(["export", str(run), "--name", "refused"]) == 2
    captured = capsys.readouterr()
    assert "ONNX and PyTorch logits differ by 5.00e-01 (> 1e-04)" in captured.err
    assert captured.out == ""
    assert not (run / "artifact").exists()
    assert not (bentoml_home / "models" / "refused").exists()


def test_onnx_graph_matches_pytorch_for_any_batch_size(artifact_dir, trained_run) -> None:
    model, _ = load_trained_model(trained_run)
    assert check_onnx_matches(model, artifact_dir) <= 1e-4
    classifier = OnnxClassifier(artifact_dir)
    for batch in (1, 7):
        pixels = torch.randn(batch, 3, 40, 40)
        with torch.no_grad():
            expected = model(pixels).numpy()
        assert np.abs(classifier.logits(pixels.numpy()) - expected).max() <= 1e-4
        # A single-threaded lane (the service's sessions under load) gives the same answer.
        lane = classifier.probabilities_on_new_session(threads=1)(pixels.numpy())
        np.testing.assert_allclose(lane, classifier.probabilities(pixels.numpy()), atol=1e-6)


def test_a_run_whose_model_json_lists_classes_and_one_temperature_still_exports(
    trained_run: Path, artifact_dir: Path, tmp_path: Path
) -> None:
    # model.json as runs wrote it before test-time views: the class list, one temperature.
    run = shutil.copytree(
        trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("artifact", "checkpoints")
    )
    raw = json.loads((run / "model.json").read_text())
    del raw["temperatures"]
    (run / "model.json").write_text(json.dumps({**raw, "classes": ["a", "b", "c"]}))
    model, description = load_trained_model(run)  # the weights load strictly
    manifest = build_manifest(run, description)
    assert manifest.temperatures == {"none": raw["temperature"]}
    assert manifest.classes == ("circle", "square", "triangle")  # the split's, as always
    assert check_onnx_matches(model, artifact_dir) <= 1e-4


@pytest.mark.parametrize(
    "victim", ["model.onnx", "explain.onnx", "weights.safetensors", "manifest.json"]
)
def test_a_modified_artifact_is_refused(artifact_dir: Path, tmp_path: Path, victim: str):
    copy = shutil.copytree(artifact_dir, tmp_path / "artifact")
    if victim == "manifest.json":
        manifest = json.loads((copy / victim).read_text())
        manifest["files"]["model.onnx"] = "0" * 64
        (copy / victim).write_text(json.dumps(manifest))
    else:
        data = bytearray((copy / victim).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / victim).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its recorded sha256"):
        OnnxClassifier(copy)


def test_model_store_and_directory_references(exported_model: str, artifact_dir: Path):
    name, version = exported_model.split(":")
    assert name == "convtune" and version
    stored = locate_artifact("convtune:latest")
    assert read_manifest(stored).files == read_manifest(artifact_dir).files
    assert locate_artifact(str(artifact_dir)) == artifact_dir
    with pytest.raises(ArtifactError, match="neither an artifact directory nor a model"):
        locate_artifact("no-such-model:latest")
    # A path, not a tag: the run was not exported yet.
    missing = artifact_dir.parent / "not-exported" / "artifact"
    with pytest.raises(ArtifactError, match="does not exist; a run's artifact is written by"):
        locate_artifact(str(missing))


def test_predict_prints_calibrated_probabilities(artifact_dir, heldout_shapes_dir, capsys):
    files = sorted(heldout_shapes_dir.glob("*/000[0-2].png"))
    assert main(["predict", "convtune:latest", *map(str, files), "--top-k", "2"]) == 0
    answer = json.loads(capsys.readouterr().out)
    # softmax(logits / T) of onnxruntime's logits, computed by the test helpers.
    expected = reference_results(artifact_dir, files)
    assert len(answer["results"]) == len(files)
    for result, want in zip(answer["results"], expected, strict=True):
        probabilities = list(result["probabilities"].values())
        row = np.array(list(want["probabilities"].values()))
        assert list(result["probabilities"]) == ["circle", "square", "triangle"]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-6)
        assert np.allclose(probabilities, row, atol=1e-6)
        assert [t["label"] for t in result["top_k"]] == [
            ["circle", "square", "triangle"][i] for i in np.argsort(-row)[:2]
        ]


def test_evaluate_on_heldout_images(exported_model, heldout_shapes_dir, capsys) -> None:
    assert main(["evaluate", "convtune:latest", "--data", str(heldout_shapes_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 45
    assert report["accuracy"] > 0.6  # chance is 1/3
    assert sum(c["support"] for c in report["per_class"].values()) == 45
    assert np.array(report["confusion_matrix"]).sum() == 45


def test_evaluate_scores_the_named_part_of_a_pre_split_tree(
    artifact_dir, heldout_shapes_dir, tmp_path, capsys
) -> None:
    (tmp_path / "tree").mkdir()
    shutil.copytree(heldout_shapes_dir, tmp_path / "tree" / "test")
    make_shapes_dataset(tmp_path / "tree" / "train", per_class=2, seed=9)
    tree = str(tmp_path / "tree")
    assert main(["evaluate", str(artifact_dir), "--data", tree, "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 45
    # Scoring all of it would mix the training images in.
    assert main(["evaluate", str(artifact_dir), "--data", tree]) == 2
    assert "comes split (pre-split tree" in capsys.readouterr().err
    assert main(["evaluate", str(artifact_dir), "--data", tree, "--split", "val"]) == 2
    assert "has no val part (its parts: train, test)" in capsys.readouterr().err


def test_evaluate_uses_the_runs_saved_split(
    trained_run, artifact_dir, shapes_dir, tmp_path, capsys
) -> None:
    args = ["evaluate", str(artifact_dir), "--data", str(shapes_dir),
            "--run", str(trained_run), "--split", "val", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert (tmp_path / "report.html").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["n"] == report["n"]
    assert report["binary"]["negative_classes"] == ["circle"]  # the run's binary view
    val_count = len(json.loads((trained_run / "split.json").read_text())["val"])
    assert report["n"] == val_count
    recorded = read_manifest(trained_run / "artifact").val_metrics["accuracy"]
    assert report["accuracy"] == pytest.approx(recorded, abs=1e-6)


def test_softmax_of_hand_computable_logits() -> None:
    # exp(0), exp(ln 2), exp(ln 3) are 1, 2, 3: the probabilities are 1/6, 2/6, 3/6.
    sixths = np.array([[1.0, 2.0, 3.0]]) / 6
    np.testing.assert_allclose(softmax(np.log([[1.0, 2.0, 3.0]])), sixths, rtol=1e-12)
    # Temperature divides the logits: ln(1, 4, 9) at T = 2 is ln(1, 2, 3), and at T = 1
    # its probabilities are 1/14, 4/14, 9/14.
    squares = np.log([[1.0, 4.0, 9.0]])
    np.testing.assert_allclose(softmax(squares, 2.0), sixths, rtol=1e-12)
    np.testing.assert_allclose(softmax(squares), [[1 / 14, 4 / 14, 9 / 14]], rtol=1e-12)
    # Shifting every logit by 1000 changes nothing, where exp(1000) alone would overflow.
    np.testing.assert_allclose(softmax(np.log([[1.0, 2.0, 3.0]]) + 1000), sixths, rtol=1e-12)
    # Logits 1000 apart: the others' share, exp(-1000), is below float64's range.
    assert softmax(np.array([[1000.0, 0.0, -1000.0]])).tolist() == [[1.0, 0.0, 0.0]]


def test_evaluate_refuses_classes_the_model_does_not_know(artifact_dir, tmp_path) -> None:
    from convtune.training.evaluate import artifact_logits

    root = make_shapes_dataset(tmp_path / "d", per_class=2)
    (root / "circle").rename(root / "hexagon")
    with pytest.raises(ValueError, match="hexagon"):
        artifact_logits(artifact_dir, load_labelled_images(root))


def test_evaluate_of_the_export_reproduces_the_runs_test_report(tmp_path, capsys) -> None:
    # Images larger than the input, PNG and JPEG, through the image cache: the run's own
    # test report must describe exactly what the exported model answers for those files.
    from PIL import Image

    from convtune.data.synthetic import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "data", per_class=20, size=96, seed=3)
    for path in sorted(data.glob("*/*.png"))[::2]:
        Image.open(path).save(path.with_suffix(".jpg"), quality=90)
        path.unlink()
    run = tmp_path / "run"
    args = ["fit", "--data", str(data), "--out", str(run), "--model", "test_resnet",
            "--pretrained", "none", "--epochs", "1", "--freeze-epochs", "0", "--img-size", "32",
            "--batch-size", "8", "--num-workers", "0", "--cache-images",
            "--test-fraction", "0.4"]  # fmt: skip
    assert main(args) == 0
    assert main(["export", str(run), "--name", "reproduce"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run / "artifact"), "--data", str(data), "--run", str(run),
                 "--split", "test", "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    evaluated = json.loads(capsys.readouterr().out)
    reported = json.loads((run / "metrics.json").read_text())
    assert evaluated["n"] == reported["n"] == 24
    assert evaluated["confusion_matrix"] == reported["confusion_matrix"]
    assert evaluated["accuracy"] == reported["accuracy"]
    assert evaluated["nll"] == pytest.approx(reported["nll"], abs=1e-5)
    assert evaluated["ece"] == pytest.approx(reported["ece"], abs=1e-5)
