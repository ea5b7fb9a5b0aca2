"""What the network sees: class maps, Grad-CAM, maps back on the image, inspect, explain."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch
from helpers import loaded_after
from PIL import Image, ImageDraw
from safetensors.numpy import load_file
from torch.utils.flop_counter import FlopCounterMode

from convtune.data.images import decode_rgb
from convtune.data.preprocessing import EvalGeometry, Preprocessing
from convtune.data.synthetic import draw_shape
from convtune.models.artifact import ArtifactError, Manifest, read_manifest, sha256_file
from convtune.models.cam import (
    class_activation_map,
    feature_grid,
    most_active_channels,
    overlay,
    png_bytes,
)
from convtune.models.inference import OnnxClassifier
from convtune.training.cli import main
from convtune.training.explain import grad_cam, load_artifact_model
from convtune.training.inspect import stage_rows

PREPROCESSING = Preprocessing(input_size=(40, 40), mean=(0.5,) * 3, std=(0.5,) * 3)


def shapes_batch(classifier: OnnxClassifier, count: int = 6) -> np.ndarray:
    rng = np.random.default_rng(7)
    images = [np.asarray(draw_shape(s, rng, size=40)) for s in ("circle", "square", "triangle")]
    images = (images * count)[:count]
    return np.stack([classifier.preprocess(image) for image in images])


def test_class_maps_average_to_the_logits_and_are_the_head_at_each_position(
    artifact_dir: Path,
) -> None:
    classifier = OnnxClassifier(artifact_dir)
    pixels = shapes_batch(classifier)
    explained = classifier.explain(pixels)
    maps = explained.class_maps
    assert maps is not None and maps.shape == (len(pixels), 3, 2, 2)
    # CAM's identity: the mean over positions (the head's average pooling) is the logit.
    np.testing.assert_allclose(maps.mean(axis=(2, 3)), classifier.logits(pixels), atol=1e-4)
    # Each position is the head's weights · that position's features, plus the bias once:
    # test_resnet's last stage is the volume the head pools.
    weights = load_file(artifact_dir / "weights.safetensors")
    last_stage = explained.stages["stage_5"]
    expected = np.einsum("nfhw,cf->nchw", last_stage, weights["head.0.weight"])
    expected += weights["head.0.bias"][None, :, None, None]
    np.testing.assert_allclose(maps, expected, atol=1e-4)
    assert np.abs(weights["head.0.bias"]).max() > 1e-3  # a bias to get right
    np.testing.assert_allclose(explained.probabilities, classifier.probabilities(pixels), atol=1e-6)


def test_grad_cam_draws_the_same_map_as_cam_on_a_linear_head(artifact_dir: Path) -> None:
    import torch

    classifier = OnnxClassifier(artifact_dir)
    pixels = shapes_batch(classifier)
    maps = classifier.explain(pixels).class_maps
    model = load_artifact_model(classifier)
    for class_index in range(3):
        gradients = grad_cam(model, torch.from_numpy(pixels), [class_index] * len(pixels))
        cam = maps[:, class_index]
        correlation = np.corrcoef(gradients.ravel(), cam.ravel())[0, 1]
        assert correlation > 0.999, correlation
        # Exactly: Grad-CAM = (CAM - bias) / positions, as the head's gradient is W / hw.
        bias = model.head[0].bias[class_index].item()
        np.testing.assert_allclose(gradients, (cam - bias) / 4, atol=1e-4)


@pytest.mark.parametrize("mode", ["center", "squash", "border"])
@pytest.mark.parametrize(("height", "width"), [(60, 100), (100, 60), (50, 50)])
def test_a_map_goes_back_onto_the_pixels_the_view_took_it_from(mode, height, width) -> None:
    # The map of a blob seen through the eval view (its input pixels, averaged down to the
    # cells of a 5x5 map) lands on the blob in the original image, however the view
    # cropped, squashed or padded it.
    geometry = EvalGeometry(replace(PREPROCESSING, crop_pct=0.875, crop_mode=mode))
    place = geometry.placement(height, width)
    for corner_y, corner_x in [(0.3, 0.3), (0.3, 0.7), (0.7, 0.3), (0.7, 0.7)]:
        image = np.full((height, width, 3), 128, np.uint8)  # the padding's colour
        y = round(place.top + corner_y * place.crop_height)
        x = round(place.left + corner_x * place.crop_width)
        cv2.circle(image, (x, y), 4, (255, 255, 255), -1)
        view = geometry(image)[..., 0].astype(np.float32)
        cells = cv2.resize(view, (5, 5), interpolation=cv2.INTER_AREA)
        heat = class_activation_map(cells, geometry=place)
        assert heat.shape == (height, width) and heat.max() > 0.9
        peak_y, peak_x = np.unravel_index(np.argmax(heat), heat.shape)
        cell = max(place.crop_height, place.crop_width) / 5
        assert abs(peak_y - y) <= cell and abs(peak_x - x) <= cell, (mode, peak_y, peak_x, y, x)


def corner_image(corner: tuple[int, int], *, height: int, width: int) -> np.ndarray:
    """A dark image with one light square in ``corner`` (row, column: 0 or 1) of its
    centre square, which the center view keeps."""
    image = Image.new("RGB", (width, height), (40, 40, 40))
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    size = side * 0.3
    y0 = top + (0.1 * side if corner[0] == 0 else side - 0.1 * side - size)
    x0 = left + (0.1 * side if corner[1] == 0 else side - 0.1 * side - size)
    ImageDraw.Draw(image).rectangle([x0, y0, x0 + size, y0 + size], fill=(230, 230, 230))
    return np.asarray(image)


@pytest.mark.parametrize("corner", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_the_map_peaks_in_the_corner_that_holds_the_evidence(artifact_dir, corner) -> None:
    # The suite's model knows squares: a square in one corner of a wide image (of which
    # the center view keeps the centre square) is the evidence, and the map of "square"
    # on the original image's pixels peaks in that corner.
    classifier = OnnxClassifier(artifact_dir)
    rgb = corner_image(corner, height=60, width=90)
    maps = classifier.explain(classifier.preprocess(rgb)[np.newaxis]).class_maps
    heat = class_activation_map(maps[0, 1], geometry=classifier.placement(rgb))
    assert heat.shape == (60, 90)
    peak_y, peak_x = np.unravel_index(np.argmax(heat), heat.shape)
    assert (int(peak_y >= 30), int(peak_x >= 45)) == corner


def test_inspect_rows_are_timms_feature_info(artifact_dir: Path) -> None:
    manifest = read_manifest(artifact_dir)
    rows = stage_rows(manifest, manifest.explain)
    encoder = timm.create_model("test_resnet", num_classes=0, pretrained=False)
    stages = [row for row in rows if row["layer"].startswith("stage")]
    assert len(stages) == len(encoder.feature_info)
    for row, info in zip(stages, encoder.feature_info, strict=True):
        side = -(-40 // info["reduction"])  # the volume at the 40-pixel input, rounded up
        assert row["volume"] == f"{info['num_chs']}×{side}×{side}"
        assert row["stride"] == info["reduction"]
    # Every parameter of the model is counted once: stages, what follows them, the head.
    weights = load_file(artifact_dir / "weights.safetensors")
    counted = sum(array.size for name, array in weights.items() if "running" not in name
                  and "num_batches" not in name)  # fmt: skip
    assert sum(row["parameters"] for row in rows) == counted
    assert rows[-1]["layer"] == "head (fully connected)" and rows[-1]["parameters"] == 96 * 3 + 3
    assert rows[-1]["macs"] == 96 * 3
    # Each stage's multiply-adds as torch's FLOP counter counts them (2 FLOPs each, for
    # convolutions and matrix products): test_resnet's stem, then each of its layers.
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder.eval()(torch.zeros(1, 3, 40, 40))
    flops = counter.get_flop_counts()
    per_stage = [sum(flops[f"ResNet.{name}"].values()) // 2
                 for name in ("conv1", "layer1", "layer2", "layer3", "layer4")]  # fmt: skip
    assert [row["macs"] for row in stages] == per_stage


def test_inspect_and_explain_need_no_torch(artifact_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "square.png"
    Image.fromarray(corner_image((0, 1), height=60, width=90)).save(image)
    out = tmp_path / "maps"
    status, loaded, answer = loaded_after(
        ["inspect", str(artifact_dir), str(image), "--out", str(out)]
    )
    assert status == 0 and loaded == [], answer
    table, _, printed = answer.partition("\n{")
    assert table.splitlines()[0].split()[:2] == ["layer", "volume"]
    assert "stage 5" in table and "pooling (avg)" in table
    prediction = json.loads("{" + printed)
    assert prediction["label"] in ("circle", "square", "triangle")
    assert prediction["feature_maps"] == [str(out / f"stage_{k}.png") for k in range(1, 6)]
    assert decode_rgb(out / "stage_1.png").shape[2] == 3

    cam = tmp_path / "cam.png"
    status, loaded, answer = loaded_after(
        ["explain", str(artifact_dir), str(image), "--class", "circle", "--out", str(cam)]
    )
    assert status == 0 and loaded == [], answer
    result = json.loads(answer)
    assert (result["explained_class"], result["method"]) == ("circle", "CAM")
    assert decode_rgb(cam).shape == (60, 90, 3)


def test_explain_names_a_class_the_model_does_not_have(artifact_dir, tmp_path, capsys) -> None:
    image = tmp_path / "square.png"
    Image.fromarray(corner_image((0, 0), height=40, width=40)).save(image)
    out = tmp_path / "cam.png"
    assert (
        main(["explain", str(artifact_dir), str(image), "--class", "cat", "--out", str(out)]) == 2
    )
    assert "--class 'cat' is not one of the model's classes: circle, square, triangle" in (
        capsys.readouterr().err
    )
    assert not out.exists()


def test_an_artifact_exported_before_feature_maps_loads_and_says_to_re_export(
    artifact_dir: Path, tmp_path: Path
) -> None:
    raw = json.loads((artifact_dir / "manifest.json").read_text())
    assert "explain" in raw
    del raw["explain"]
    assert Manifest.from_json(raw).explain is None
    old = json.loads((Path(__file__).parent / "fixtures" / "manifest-v1.json").read_text())
    assert Manifest.from_json(old).explain is None
    classifier = OnnxClassifier(artifact_dir)
    classifier.manifest = Manifest.from_json(raw)
    with pytest.raises(ArtifactError, match="re-export the run with this version"):
        classifier.explain(np.zeros((1, 3, 40, 40), np.float32))


def test_an_artifact_whose_one_graph_gives_every_output_still_explains(
    artifact_dir: Path, tmp_path: Path
) -> None:
    # As convtune exported before the logits got a graph of their own: model.onnx gives the
    # class maps and stages too, and the manifest's explain names no graph.
    old = shutil.copytree(artifact_dir, tmp_path / "artifact")
    (old / "explain.onnx").replace(old / "model.onnx")
    raw = json.loads((old / "manifest.json").read_text())
    del raw["explain"]["graph"], raw["files"]["explain.onnx"]
    raw["files"]["model.onnx"] = sha256_file(old / "model.onnx")
    (old / "manifest.json").write_text(json.dumps(raw))
    classifier, current = OnnxClassifier(old), OnnxClassifier(artifact_dir)
    assert classifier.explain_outputs().graph == "model.onnx"
    pixels = shapes_batch(classifier, count=2)
    explained, expected = classifier.explain(pixels), current.explain(pixels)
    np.testing.assert_allclose(explained.class_maps, expected.class_maps, atol=1e-6)
    assert explained.stages.keys() == expected.stages.keys()
    np.testing.assert_allclose(classifier.probabilities(pixels), current.probabilities(pixels))


def test_feature_grid_overlay_and_png() -> None:
    stage = np.zeros((5, 3, 4), np.float32)
    stage[3] = 5.0
    stage[3, 0, 0] = 0.0
    stage[1] = -2.0  # active in magnitude
    assert most_active_channels(stage, 2) == [3, 1]
    grid = feature_grid(stage, [3, 1, 0])
    tile_h, tile_w = 3 * 16, 4 * 16  # enlarged to at least 48 pixels a side
    assert grid.shape == (2 * tile_h + 2, 2 * tile_w + 2, 3) and grid.dtype == np.uint8
    assert (grid[tile_h:, tile_w:] == 0).all()  # three tiles of a 2x2 grid: one empty
    rgb = np.full((6, 8, 3), 100, np.uint8)
    heat = np.zeros((6, 8), np.float32)
    np.testing.assert_array_equal(overlay(rgb, heat, 0.0), rgb)
    with pytest.raises(ValueError, match=r"a map of \(6, 7\) cannot lie over an image of"):
        overlay(rgb, heat[:, :7])
    decoded = cv2.imdecode(np.frombuffer(png_bytes(grid), np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), grid)
