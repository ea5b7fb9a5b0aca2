"""``convtune export --quantize int8``: calibrated on the run's training images, judged on
its val split, refused where it disagrees with the float graph, served unchanged."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from convtune.data.synthetic import draw_shape
from convtune.models.artifact import Manifest, read_manifest
from convtune.models.inference import OnnxClassifier
from convtune.training.cli import main
from convtune.training.quantize import DEFAULT_CALIBRATION_METHOD


@pytest.fixture(scope="module")
def int8_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("int8") / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("artifact", "checkpoints"))
    # The suite's two-epoch model has near ties: 1 % of its val images are within 0.02 of a
    # logit from a second class, and a few flip under int8. The share to require is the
    # user's to set; the default (99 %) is checked by the refusal below. One net flip of
    # its 120 val images costs 0.83 points of accuracy, more than the default 0.5.
    quantize = ["--quantize", "int8", "--min-agreement", "0.95", "--max-accuracy-drop", "2",
                "--calibration-images", "128"]  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(run), "--name", "int8", *quantize]) == 0
    assert re.fullmatch(r"int8:[a-z0-9]+\n", printed.getvalue())  # the tag alone
    return run


def test_the_int8_artifact_records_how_it_was_made_and_agrees_with_float(
    int8_run: Path, artifact_dir: Path
) -> None:
    artifact = int8_run / "artifact"
    manifest = read_manifest(artifact)  # the hashes cover the quantized graph
    quantization = manifest.quantization
    assert quantization is not None and quantization.precision == "int8"
    assert quantization.method == DEFAULT_CALIBRATION_METHOD
    split = json.loads((int8_run / "split.json").read_text())
    assert quantization.calibration_images == 128
    assert quantization.validation_images == len(split["val"])
    assert quantization.agreement >= quantization.min_agreement == 0.95
    assert set(quantization.val) == {"float32", "int8"}
    assert quantization.val["float32"]["accuracy"] - quantization.val["int8"]["accuracy"] <= 0.02
    # The logits' graph computes in int8; the explaining one stays float.
    ops = {node.op_type for node in onnx.load(artifact / "model.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    explain_ops = {node.op_type for node in onnx.load(artifact / "explain.onnx").graph.node}
    assert "QuantizeLinear" not in explain_ops
    # The manifest reads back as written.
    raw = json.loads((artifact / "manifest.json").read_text())
    assert json.loads(json.dumps(Manifest.from_json(raw).to_json())) == raw
    # Served unchanged: the same answers as the float artifact on the val images.
    int8, float32 = OnnxClassifier(artifact), OnnxClassifier(artifact_dir)
    images = [int8.decode(path) for path, _ in split["val"][:32]]
    assert (int8.classify(images).argmax(1) == float32.classify(images).argmax(1)).mean() >= 0.95


def test_predict_runs_the_int8_artifact(
    int8_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "square.png"
    draw_shape("square", np.random.default_rng(3), size=40).save(image)
    assert main(["predict", str(int8_run / "artifact"), str(image), "--format", "jsonl"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] == "square"


def test_an_int8_graph_that_disagrees_is_refused_and_the_float_one_kept(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Calibrated on one black image, every activation range is about zero: the int8 graph
    # clips nearly everything, and its answers part from the float graph's.
    run = shutil.copytree(
        trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("artifact", "checkpoints")
    )
    black = tmp_path / "black.png"
    Image.new("RGB", (40, 40)).save(black)
    split = json.loads((run / "split.json").read_text())
    (run / "split.json").write_text(json.dumps({**split, "train": [[str(black), "circle"]]}))
    assert main(["export", str(run), "--name", "refused", "--quantize", "int8",
                 "--calibration-method", "minmax"]) == 2  # fmt: skip
    error = capsys.readouterr().err
    assert re.search(r"the int8 graph agrees with the float one on \d+\.\d\d% of 120 val images "
                     r"\(needs 99\.0%\)", error), error  # fmt: skip
    assert "not written; try more calibration images or another calibration method" in error
    assert not (run / "artifact").exists()


def test_quantize_options_are_checked(trained_run: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["export", str(trained_run), "--name", "x", "--quantize", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    # Checked before any export work: the answer is immediate.
    for flag, value, message in (
        ("--max-accuracy-drop", "150", "0 to 100 points, not 150"),
        ("--min-agreement", "1.5", "a share in [0, 1], not 1.5"),
    ):
        code = main(["export", str(trained_run), "--name", "x", "--quantize", "int8", flag, value])
        assert code == 2
        assert message in capsys.readouterr().err
