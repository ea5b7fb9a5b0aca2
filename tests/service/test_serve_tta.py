"""The service of a model exported with ``--serve-tta d4``: the same numbers as
``convtune predict --tta d4``, alone, batched and in inference lanes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    TOLERANCE,
    assert_concurrent_answers,
    assert_prediction,
    assert_same_numbers,
    image_file,
    largest_difference,
    post,
    reference_results,
)

from convtune.data.images import decode_rgb
from convtune.models.inference import OnnxClassifier
from convtune.service.batching import GreedyBatcher
from convtune.training.cli import main


@pytest.fixture(scope="module")
def tta_tag(exported, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``convtune export --serve-tta d4`` of a copy of the suite's run (whose own artifact
    the other tests use), into the suite's model store."""
    run_dir = shutil.copytree(exported.run_dir, tmp_path_factory.mktemp("tta") / "run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        args = ["export", str(run_dir), "--name", "convtune-tta", "--serve-tta", "d4"]
        assert main(args) == 0
    manifest = json.loads((run_dir / "artifact" / "manifest.json").read_text())
    assert manifest["serving"] == {"tta": "d4"}
    return out.getvalue().strip()


@pytest.fixture(scope="module")
def tta_server(start_server, tta_tag: str) -> Iterator[str]:
    with start_server("serve-tta", CONVTUNE_MODEL=tta_tag) as served:
        yield served.url


@pytest.fixture(scope="module")
def cli_tta_results(exported, probe_images: list[Path]) -> list[dict]:
    """``convtune predict --tta d4`` on the probe images, with the suite's own artifact."""
    out = exported.run(
        "-m", "convtune", "predict", str(exported.artifact_dir), *map(str, probe_images),
        "--top-k", "99", "--tta", "d4",
    )  # fmt: skip
    return json.loads(out)["results"]


@pytest.fixture(scope="module")
def expected_tta_results(exported, probe_images: list[Path]) -> list[dict]:
    """The mean over the 8 views of softmax(logits / T_d4), computed by the test helpers."""
    return reference_results(exported.artifact_dir, probe_images, views="d4")


@pytest.mark.slow
def test_served_views_give_the_numbers_of_predict_with_them(
    tta_server, tta_tag, exported, probe_images, cli_tta_results, expected_tta_results,
    expected_results,
) -> None:  # fmt: skip
    for path, cli, expected in zip(probe_images, cli_tta_results, expected_tta_results,
                                   strict=True):  # fmt: skip
        assert_same_numbers(cli, expected)
        response = post(tta_server, "predict", files={"image": image_file(path)})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == tta_tag
        assert_prediction(body, exported.classes, top_k=5)
        assert_same_numbers(body, expected)
    # The views change the answer, and so does their own temperature.
    assert largest_difference(expected_tta_results, expected_results) > 100 * TOLERANCE
    manifest = json.loads((exported.artifact_dir / "manifest.json").read_text())
    at_single_temperature = reference_results(
        exported.artifact_dir, probe_images, views="d4", temperature=manifest["temperature"]
    )
    assert largest_difference(expected_tta_results, at_single_temperature) > 100 * TOLERANCE


@pytest.mark.slow
def test_served_views_survive_batching_and_lanes(
    tta_server, probe_images, expected_tta_results
) -> None:
    """Concurrent requests share onnxruntime calls of 8 views per image, in lanes too."""
    assert_concurrent_answers(tta_server, probe_images, expected_tta_results, singles=24,
                              batches=2, repeat=3, workers=8)  # fmt: skip


def test_batcher_with_view_lanes_gives_each_request_its_rows(
    exported, probe_images, expected_tta_results
) -> None:
    """In process: requests spread over a whole-machine session and single-thread lanes,
    each inferring 8 views per image, get the rows of one call on their own images."""
    classifier = OnnxClassifier(exported.artifact_dir, tta="d4")
    pixels = np.stack([classifier.preprocess(decode_rgb(path)) for path in probe_images])
    bounds = [1, 3, 4, 7]  # requests of 1, 2, 1, 3 and 2 images
    requests = np.split(pixels, bounds)
    expected = np.split(
        np.array([list(r["probabilities"].values()) for r in expected_tta_results]), bounds
    )

    async def scenario() -> list[np.ndarray]:
        batcher = GreedyBatcher(
            classifier.probabilities,
            lanes=[classifier.probabilities_on_new_session(threads=1) for _ in range(2)],
            max_batch_size=4,
            max_wait_s=10,
        )
        return await asyncio.gather(*(batcher(lambda r=r: r) for r in requests))

    for rows, want in zip(asyncio.run(scenario()), expected, strict=True):
        np.testing.assert_allclose(rows, want, atol=TOLERANCE)
