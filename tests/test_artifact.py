"""The manifest schema: one writer, one reader, and manifests already written still read."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from convtune.models.artifact import ArtifactError, Manifest, read_manifest, sha256_file
from convtune.models.inference import OnnxClassifier

# Exported by convtune before the manifest had a schema class, from a one-epoch run of the
# suite's recipe (tests/conftest.py): the exact bytes that code wrote.
MANIFEST_V1 = Path(__file__).parent / "fixtures" / "manifest-v1.json"


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
