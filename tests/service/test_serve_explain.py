"""``POST /explain`` on the suite's real ``bentoml serve``: the prediction, the class
activation map over the image, the stages' feature maps, and the same refusals as
``/predict``."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import shutil

import numpy as np
import pytest
from helpers import assert_json_error, drawing, encode, image_file, post
from PIL import Image

from convtune.models.artifact import read_manifest, write_manifest
from convtune.models.cam import FEATURE_COLOURS, coloured, most_active_channels, normalised
from convtune.models.inference import OnnxClassifier
from convtune.service.explain import (
    THUMBNAIL_COLUMNS,
    THUMBNAIL_SIDE,
    NotExplainable,
    explain_image,
    explanation_json,
    overlay_png,
    thumbnail_sheet,
    wants_png,
)

pytestmark = pytest.mark.slow


def decoded_png(data: str | bytes) -> np.ndarray:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def test_explain_answers_the_prediction_its_map_and_the_stages(
    server, exported, probe_images
) -> None:
    manifest = read_manifest(exported.artifact_dir)
    for path in probe_images[:3]:
        files = {"image": image_file(path)}
        predicted = post(server, "predict", files=files).json()
        response = post(server, "explain", files=files)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        answer = response.json()
        assert answer["model"] == predicted["model"] == exported.tag
        assert answer["label"] == predicted["label"] == answer["class"]
        assert [entry["label"] for entry in answer["top_k"]] == [
            entry["label"] for entry in predicted["top_k"]
        ]
        for name, probability in predicted["probabilities"].items():
            assert answer["probabilities"][name] == pytest.approx(probability, abs=1e-6)

        width, height = Image.open(path).size
        image = np.asarray(Image.open(path).convert("RGB"))
        over = decoded_png(answer["overlay"])
        assert over.shape == (height, width, 3)
        assert np.abs(over.astype(int) - image).mean() > 10  # a map is drawn over the image
        heat = decoded_png(answer["heatmap"])
        assert heat.shape[1] / heat.shape[0] == pytest.approx(width / height, rel=0.05)

        stated = [stage for stage in manifest.explain.stages if stage.output is not None]
        assert [stage["name"] for stage in answer["stages"]] == [s.output for s in stated]
        for stage, volume in zip(answer["stages"], stated, strict=True):
            assert (stage["channels"], stage["height"], stage["width"], stage["stride"]) == (
                volume.channels, volume.height, volume.width, volume.stride,
            )  # fmt: skip
            tiles = stage["tiles"]
            assert sorted(tiles["channels"]) == list(range(volume.channels))
            rows = -(-volume.channels // tiles["columns"])
            sheet = decoded_png(tiles["png"])
            assert sheet.shape[:2] == (
                rows * tiles["tile_height"],
                tiles["columns"] * tiles["tile_width"],
            )


def test_explain_maps_a_requested_class_and_answers_a_png_when_asked(
    server, exported, probe_images
) -> None:
    files = {"image": image_file(probe_images[0])}
    predicted = post(server, "predict", files=files).json()["label"]
    other = next(name for name in exported.classes if name != predicted)
    as_json = post(server, "explain", files=files, data={"class": other}).json()
    assert as_json["class"] == other and as_json["label"] == predicted

    response = post(
        server, "explain", files=files, data={"class": other}, headers={"Accept": "image/png"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-request-id"]
    # The same overlay as the JSON's, the image's size.
    assert np.array_equal(decoded_png(response.content), decoded_png(as_json["overlay"]))
    # JSON wins a tie and a wildcard.
    for accept in ("*/*", "application/json, image/png", "image/png;q=0.5, application/json"):
        answer = post(server, "explain", files=files, headers={"Accept": accept})
        assert answer.headers["content-type"] == "application/json", accept


BAD_REQUESTS = {
    "not an image": {"files": {"image": ("notes.txt", b"just some text", "text/plain")}},
    "not multipart": {"data": {"top_k": "2"}},
    "no file": {"files": {"top_k": (None, "2")}},
    "text in the file field": {"files": {"image": (None, "http://127.0.0.1:1/cat.png")}},
    "two files": {
        "files": [("image", ("a.png", encode(drawing(), "PNG"))), ("image", ("b.png", b"x"))]
    },
    "a bad top_k": {
        "files": {"image": ("a.png", encode(drawing(), "PNG"))},
        "data": {"top_k": "0"},
    },
    "over the body limit": {"files": {"image": ("big.png", bytes(20 * 1024 * 1024 + 1))}},
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_explain_refuses_what_predict_refuses_with_the_same_reason(server, case) -> None:
    predicted = post(server, "predict", **BAD_REQUESTS[case])
    explained = post(server, "explain", **BAD_REQUESTS[case])
    assert 400 <= predicted.status_code < 500
    body = assert_json_error(explained, predicted.status_code)
    if case == "two files":  # /predict also points to /predict_batch
        assert body["error"].startswith("send exactly one file in 'image'")
    else:
        assert body == predicted.json()


def test_explain_refuses_an_unknown_class_and_a_class_sent_twice(server, exported) -> None:
    files = {"image": ("a.png", encode(drawing(), "PNG"))}
    body = assert_json_error(post(server, "explain", files=files, data={"class": "zebra"}), 400)
    assert "'zebra' is not one of the model's classes" in body["error"]
    assert exported.classes[0] in body["error"]
    twice = [("class", (None, exported.classes[0])), ("class", (None, exported.classes[1]))]
    body = assert_json_error(post(server, "explain", files=[*files.items(), *twice]), 400)
    assert body["error"] == "send class once (got 2 values)"


def test_the_api_documents_explain(server) -> None:
    import httpx

    spec = httpx.get(f"{server}/docs.json", timeout=30).json()
    operation = spec["paths"]["/explain"]["post"]
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["properties"]) == {"image", "top_k", "class"}
    assert {"application/json", "image/png"} <= set(operation["responses"]["200"]["content"])
    assert "re-export" in operation["responses"]["409"]["description"]
    assert "ConvtuneExplanation" in spec["components"]["schemas"]
    routes = httpx.get(f"{server}/schema.json", timeout=30).json()["routes"]
    [route] = [route for route in routes if route["route"] == "/explain"]
    assert set(route["input"]["properties"]) == {"image", "top_k", "class"}


def test_a_model_exported_without_feature_maps_gets_a_409_saying_to_re_export(
    exported, start_server, tmp_path
) -> None:
    from convtune.training.export import register_in_store

    legacy = tmp_path / "legacy-artifact"
    shutil.copytree(exported.artifact_dir, legacy)
    # As convtune wrote artifacts before explain outputs existed: no `explain` field, and
    # no graph for it.
    manifest = read_manifest(legacy)
    (legacy / "explain.onnx").unlink()
    write_manifest(legacy, dataclasses.replace(manifest, explain=None))
    assert "explain" not in json.loads((legacy / "manifest.json").read_text())
    tag = register_in_store(legacy, "legacy", bentoml_home=exported.bentoml_home)

    with start_server("legacy", CONVTUNE_MODEL=tag) as served:
        files = {"image": ("a.png", encode(drawing(), "PNG"))}
        assert post(served.url, "predict", files=files).status_code == 200
        body = assert_json_error(post(served.url, "explain", files=files), 409)
        assert tag in body["error"] and "re-export" in body["error"]


@pytest.mark.parametrize(
    ("accept", "png"),
    [
        ("", False),
        ("*/*", False),
        ("image/png", True),
        ("image/png, application/json", False),
        ("application/json;q=0.5, image/png", True),
        ("image/png;q=0.9, application/json;q=0.8", True),
        ("image/*", False),
        ("image/png;q=nonsense", False),
    ],
)
def test_png_is_answered_only_when_preferred_to_json(accept, png) -> None:
    assert wants_png(accept) is png


def test_a_head_without_class_maps_answers_the_stages_and_why_there_is_no_map(
    exported, tmp_path
) -> None:
    # As an artifact whose head is not linear states it: no class_maps output named.
    artifact = tmp_path / "artifact"
    shutil.copytree(exported.artifact_dir, artifact)
    manifest = read_manifest(artifact)
    explain = dataclasses.replace(manifest.explain, class_maps=None)
    write_manifest(artifact, dataclasses.replace(manifest, explain=explain))
    classifier = OnnxClassifier(artifact)
    rgb = np.asarray(drawing())

    explained = explain_image(classifier, rgb, class_name=None)
    assert explained.heat is None
    answer = explanation_json(classifier, rgb, explained, top_k=2)
    assert answer["overlay"] is None and answer["heatmap"] is None
    assert "not a single linear layer" in answer["map_unavailable"]
    assert [stage["name"] for stage in answer["stages"]] == list(explained.stages)
    with pytest.raises(NotExplainable, match="Grad-CAM") as refused:
        overlay_png(rgb, explained)
    assert refused.value.status == 409


def test_a_stage_sheet_holds_every_channel_most_active_first(exported) -> None:
    classifier = OnnxClassifier(exported.artifact_dir)
    explained = explain_image(classifier, np.asarray(drawing()), class_name=None)
    # A stage with more channels than a row, its maps small enough to keep their size.
    maps = next(
        volume
        for volume in explained.stages.values()
        if len(volume) > THUMBNAIL_COLUMNS and max(volume.shape[1:]) <= THUMBNAIL_SIDE
    )
    order = most_active_channels(maps, len(maps))
    sheet, (height, width) = thumbnail_sheet(maps, order)
    rows = -(-len(maps) // THUMBNAIL_COLUMNS)
    assert (height, width) == maps.shape[1:]
    assert sheet.shape == (rows * height, THUMBNAIL_COLUMNS * width, 3)
    activity = np.abs(maps).mean(axis=(1, 2))
    assert activity[order[0]] == activity.max()
    for index in (0, 1, THUMBNAIL_COLUMNS):  # the first two tiles, and the second row's first
        top, left = index // THUMBNAIL_COLUMNS * height, index % THUMBNAIL_COLUMNS * width
        tile = sheet[top : top + height, left : left + width]
        expected = coloured(normalised(maps[order[index]]), FEATURE_COLOURS)
        assert np.array_equal(tile, expected), index


def test_bentoml_clients_call_explain(server, probe_images) -> None:
    import bentoml

    with bentoml.SyncHTTPClient(server) as client:
        assert "class activation map" in client.explain.__doc__
        answer = client.explain(image=probe_images[0], **{"class": "square"})
    assert answer["class"] == "square"
    assert decoded_png(answer["overlay"]).shape[:2] == Image.open(probe_images[0]).size[::-1]
