"""The manifest schema: one writer, one reader, and manifests already written still read."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from convtune.models.artifact import (
    ArtifactError,
    Manifest,
    ModelDescription,
    read_manifest,
    read_model_description,
    sha256_file,
)
from convtune.models.inference import OnnxClassifier

# Exported by convtune before the manifest had a schema class, from a one-epoch run of the
# suite's recipe (tests/conftest.py): the exact bytes that code wrote.
MANIFEST_V1 = Path(__file__).parent / "fixtures" / "manifest-v1.json"
# A run's model.json as convtune wrote it before the schema class, when it still listed the
# classes (now the split's), from the suite's recipe: the exact bytes that code wrote.
MODEL_WITH_CLASSES = Path(__file__).parent / "fixtures" / "model-with-classes.json"


def test_a_manifest_already_written_reads_and_writes_back_byte_for_byte() -> None:
    text = MANIFEST_V1.read_text()
    manifest = Manifest.from_json(json.loads(text))
    assert manifest.architecture == "test_resnet"
    assert manifest.classes == ("circle", "square", "triangle")
    assert manifest.preprocessing.input_size == (40, 40)
    assert manifest.head == {"hidden_features": 0, "dropout": 0.0, "activation": "relu"}
    assert set(manifest.temperatures) == {"none", "d4"} and manifest.serving_tta == "none"
    assert manifest.temperature == manifest.val_metrics["temperature"]
    assert manifest.training_config["model"] == "test_resnet"
    assert set(manifest.files) == {"model.onnx", "weights.safetensors"}
    assert json.dumps(manifest.to_json(), indent=2) + "\n" == text


def test_a_manifest_from_before_test_time_views_reads_as_single_view() -> None:
    raw = json.loads(MANIFEST_V1.read_text())
    del raw["temperatures"], raw["serving"]
    manifest = Manifest.from_json(raw)
    assert manifest.temperatures == {"none": raw["temperature"]}
    assert manifest.serving_tta == "none"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"schema_version": 2}, "schema_version 2; this convtune reads 1"),
        ({"head": None}, "incomplete or malformed: TypeError"),
        ({"num_classes": 4}, "states {'num_classes': 4"),
        ({"input": {"name": "images"}}, "'input': {'name': 'images'}"),
    ],
)
def test_a_manifest_that_is_not_one_this_convtune_wrote_is_refused(
    change: dict, reason: str
) -> None:
    raw = {**json.loads(MANIFEST_V1.read_text()), **change}
    with pytest.raises(ArtifactError, match=re.escape(reason)):
        Manifest.from_json(raw)


def test_a_manifest_without_a_field_names_it() -> None:
    raw = json.loads(MANIFEST_V1.read_text())
    del raw["training_config"]
    with pytest.raises(ArtifactError, match=re.escape("KeyError('training_config')")):
        Manifest.from_json(raw)


def test_a_manifest_already_written_serves_the_model(artifact_dir: Path, tmp_path: Path):
    # The fixture beside this suite's exported files (their hashes are the one change): the
    # reader verifies it and the classifier answers as from the manifest written today.
    copy = tmp_path / "artifact"
    copy.mkdir()
    raw = json.loads(MANIFEST_V1.read_text())
    for name in raw["files"]:
        shutil.copyfile(artifact_dir / name, copy / name)
        raw["files"][name] = sha256_file(copy / name)
    (copy / "manifest.json").write_text(json.dumps(raw, indent=2))
    assert read_manifest(copy).created == raw["created"]
    old, current = OnnxClassifier(copy, tta=None), OnnxClassifier(artifact_dir, tta=None)
    assert old.classes == current.classes == ("circle", "square", "triangle")
    assert (old.tta, old.temperature) == ("none", raw["temperature"])
    pixels = np.random.default_rng(0).normal(size=(2, 3, 40, 40)).astype(np.float32)
    np.testing.assert_array_equal(old.logits(pixels), current.logits(pixels))


def test_a_model_description_already_written_reads_and_writes_back_without_its_classes():
    raw = json.loads(MODEL_WITH_CLASSES.read_text())
    description = ModelDescription.from_json(raw)
    assert description.structure.architecture == "test_resnet"
    assert description.structure.num_classes == 3
    assert description.structure.preprocessing.input_size == (40, 40)
    assert description.structure.head == {
        "hidden_features": 0,
        "dropout": 0.0,
        "activation": "relu",
    }
    assert description.temperatures == raw["temperatures"]
    assert description.val_metrics == raw["val_metrics"]
    del raw["classes"]
    assert json.dumps(description.to_json(), indent=2) == json.dumps(raw, indent=2)


@pytest.mark.parametrize(
    ("dropped", "temperatures"),
    [
        (("temperatures",), {"none": 1.892316270855691}),
        (("temperatures", "temperature"), {"none": 1.0}),
    ],
)
def test_a_model_description_from_before_fitted_temperatures_reads(
    dropped: tuple[str, ...], temperatures: dict[str, float]
) -> None:
    raw = json.loads(MODEL_WITH_CLASSES.read_text())
    for key in dropped:
        del raw[key]
    assert ModelDescription.from_json(raw).temperatures == temperatures


def test_a_model_description_without_a_field_names_it(tmp_path: Path) -> None:
    raw = json.loads(MODEL_WITH_CLASSES.read_text())
    del raw["val_metrics"]
    (tmp_path / "model.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=re.escape("malformed: KeyError('val_metrics')")):
        read_model_description(tmp_path)


def with_preprocessing(**changes: object) -> dict:
    raw = json.loads(MANIFEST_V1.read_text())
    return {"preprocessing": {**raw["preprocessing"], **changes}}


NAN = float("nan")
POSITIVE = "must be a finite number > 0, not"
NAMES = "classes must be a non-empty list of non-empty names, not"
SIZE = "preprocessing: input_size must be (height, width), positive whole numbers, not"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"temperature": 0.0, "temperatures": {}}, f"temperature {POSITIVE} 0.0"),
        ({"temperature": NAN, "temperatures": {}}, f"temperature {POSITIVE} nan"),
        ({"temperature": -1.9, "temperatures": {}}, f"temperature {POSITIVE} -1.9"),
        ({"temperatures": {"d4": float("inf")}}, f"temperatures['d4'] {POSITIVE} inf"),
        (
            {"temperatures": {"none": 2.0}},
            "temperature 1.892316270855691 and temperatures['none'] 2.0 must be the same",
        ),
        ({"classes": [], "num_classes": 0}, f"{NAMES} []"),
        ({"classes": ["circle", "", "square"]}, f"{NAMES} ['circle', '', 'square']"),
        ({"classes": ["circle", 7, "square"]}, f"{NAMES} ['circle', 7, 'square']"),
        ({"classes": "abc"}, f"{NAMES} 'abc'"),
        (
            {"classes": ["circle", "square", "circle"]},
            "classes must be distinct; ['circle'] repeat",
        ),
        ({"architecture": ""}, "architecture must be a non-empty string, not ''"),
        ({"serving": {"tta": 4}}, "serving.tta must be a non-empty string, not 4"),
        (with_preprocessing(input_size=[0, 40]), f"{SIZE} (0, 40)"),
        (with_preprocessing(input_size=[40.5, 40]), f"{SIZE} (40.5, 40)"),
        (with_preprocessing(input_size=[40]), f"{SIZE} (40,)"),
        (
            with_preprocessing(mean=[0.5, NAN, 0.5]),
            "preprocessing: mean must be 3 finite numbers, not (0.5, nan, 0.5)",
        ),
        (
            with_preprocessing(std=[0.5, 0.0, 0.5]),
            "preprocessing: std must be 3 finite numbers > 0, not (0.5, 0.0, 0.5)",
        ),
        (
            with_preprocessing(std=[0.5, 0.5]),
            "preprocessing: std must be 3 finite numbers > 0, not (0.5, 0.5)",
        ),
        (with_preprocessing(crop_pct=0.0), "preprocessing: crop_pct must be in (0, 1], got 0.0"),
        (with_preprocessing(crop_pct=1.5), "preprocessing: crop_pct must be in (0, 1], got 1.5"),
        (with_preprocessing(crop_mode="zoom"), "preprocessing: unknown crop_mode 'zoom'"),
        (with_preprocessing(interpolation="magic"), "preprocessing: unknown interpolation 'magic'"),
    ],
)
def test_a_manifest_value_no_model_can_be_served_with_is_refused(change: dict, reason: str) -> None:
    raw = {**json.loads(MANIFEST_V1.read_text()), **change}
    with pytest.raises(ArtifactError, match=re.escape(reason)):
        Manifest.from_json(raw)


def artifact_copy(artifact_dir: Path, destination: Path, **changes: object) -> Path:
    """A copy of the suite's artifact with ``changes`` to its manifest."""
    copy = shutil.copytree(artifact_dir, destination)
    raw = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**raw, **changes}, indent=2))
    return copy


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"serving": {"tta": "d8"}}, "serving.tta names view set 'd8'; one of ['d4', 'flip', "),
        ({"temperatures": {"d8": 1.0}}, "temperatures['d8'] names view set 'd8'"),
        (
            {"classes": ["a", "b", "c", "d"], "num_classes": 4},
            "model.onnx: the graph's 'logits' has shape ('batch', 3), its manifest's classes and "
            "preprocessing give ['N', 4]",
        ),
    ],
)
def test_a_manifest_that_does_not_fit_its_graph_or_this_convtune_is_refused(
    artifact_dir: Path, tmp_path: Path, change: dict, reason: str
) -> None:
    copy = artifact_copy(artifact_dir, tmp_path / "artifact", **change)
    with pytest.raises(ArtifactError, match=re.escape(reason)):
        OnnxClassifier(copy)


def test_an_input_size_the_graph_does_not_take_is_refused(artifact_dir: Path, tmp_path: Path):
    raw = json.loads((artifact_dir / "manifest.json").read_text())
    preprocessing = {**raw["preprocessing"], "input_size": [48, 48]}
    copy = artifact_copy(artifact_dir, tmp_path / "artifact", preprocessing=preprocessing)
    reason = "model.onnx: the graph's 'pixels' has shape ('batch', 3, 40, 40), its manifest's"
    with pytest.raises(ArtifactError, match=re.escape(reason)):
        OnnxClassifier(copy)


def test_a_file_no_hash_covers_is_refused(artifact_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(artifact_dir, tmp_path / "artifact")
    (copy / "weights.bin").write_bytes(b"\0" * 64)
    reason = "holds ['weights.bin'], which its manifest does not cover"
    with pytest.raises(ArtifactError, match=re.escape(reason)):
        read_manifest(copy)


def external_data_graph(artifact_dir: Path, copy: Path, location: str) -> None:
    """Rewrite ``copy``'s graph to keep its weights in the file at ``location`` (relative
    to the graph), with the manifest's hash of the graph updated to match."""
    import onnx

    model = onnx.load(artifact_dir / "model.onnx")
    onnx.save_model(
        model, copy / "model.onnx", save_as_external_data=True, location="weights.bin",
        size_threshold=1024,  # the weights; small constants stay in the graph
    )  # fmt: skip
    graph = onnx.load(copy / "model.onnx", load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(graph, copy / "model.onnx")
    target = (copy / location).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    (copy / "weights.bin").replace(target)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["files"]["model.onnx"] = sha256_file(copy / "model.onnx")
    (copy / "manifest.json").write_text(json.dumps(raw, indent=2))


def test_a_graph_with_unverified_external_data_is_refused(artifact_dir: Path, tmp_path: Path):
    # Beside the graph: a file the manifest does not hash.
    inside = shutil.copytree(artifact_dir, tmp_path / "inside")
    external_data_graph(artifact_dir, inside, "weights.bin")
    with pytest.raises(ArtifactError, match=re.escape("holds ['weights.bin']")):
        OnnxClassifier(inside)
    # Outside the artifact: onnxruntime refuses to read it.
    outside = shutil.copytree(artifact_dir, tmp_path / "artifact")
    external_data_graph(artifact_dir, outside, "../elsewhere/weights.bin")
    assert read_manifest(outside).files["model.onnx"] == sha256_file(outside / "model.onnx")
    with pytest.raises(Exception, match="External data path escapes model directory"):
        OnnxClassifier(outside)
