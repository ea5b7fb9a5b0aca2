"""Images that cost a decoder far more than their bytes, sent to a real ``bentoml serve``.

Each file (``benchmarks/hostile_images.py``, generated here) is inside the service's byte
and pixel limits and took Pillow or libjpeg 0.08 to 4 s of CPU (docs/benchmarks.md,
"Hostile images"); the structural rules of ``data.image_rules`` refuse it before any
decoder runs (``tests/test_images.py`` checks that Pillow never opens it), with a 400
naming the rule. The starvation case: a batch of RLE BMPs, small enough to be decoded
inline on the inference path, held every other request for as long as they took to expand.
"""

from __future__ import annotations

import io
import time

import pytest
from helpers import assert_json_error, cpu_seconds, image_file, post
from PIL import Image

from convtune.benchmarks.hostile_images import HOSTILE_IMAGES, rle_bmp

pytestmark = pytest.mark.slow

# What each refusal names: the rule the file breaks.
RULES = {
    "bmp-rle8": "a BMP with RLE8 compression, which is refused",
    "bmp-rle4": "a BMP with RLE4 compression, which is refused",
    "tiff-strips": "a TIFF whose StripOffsets lists 200,000 strips or tiles",
    "png-iccp": "a PNG with more than one iCCP (colour profile) chunk",
    "png-ztxt": "a PNG with more than 16 compressed text chunks",
    "png-tiny-chunks": "chunks (allowed: 256 plus one per 1024 bytes of file)",
    "jpeg-markers": "a JPEG with more than 1,024 segments (markers) before its image data",
    "jpeg-scans": "a JPEG of 1,000 scans, more than the 64 allowed",
    "gif-blocks": "a GIF with more than 4,096 extension blocks before its first frame",
}


def test_every_hostile_image_has_its_rule() -> None:
    assert list(RULES) == list(HOSTILE_IMAGES)


@pytest.mark.parametrize("name", list(HOSTILE_IMAGES))
def test_hostile_image_is_refused_with_its_rule(server: str, name: str) -> None:
    data = HOSTILE_IMAGES[name]()
    response = post(server, "predict", files={"image": (f"{name}.bin", data)})
    body = assert_json_error(response, 400)
    assert f"'{name}.bin': upload is " in body["error"], body
    assert RULES[name] in body["error"], body


def cpu_seconds_to_expand(data: bytes) -> float:
    """The CPU seconds Pillow spends decoding ``data`` in this process."""
    started = time.process_time()
    Image.open(io.BytesIO(data)).load()
    return time.process_time() - started


def test_a_batch_of_rle_bmps_is_refused_for_less_than_one_costs(served, probe_images) -> None:
    """64 RLE BMPs of 4,000,000 pixels each in a ~70 kB batch, decoded inline, held the model
    for ~30 s: a /predict sent meanwhile waited and got a 503. Now the batch is refused at
    its first file, for less of the server's CPU than expanding one of them takes."""
    bombs = [("images", (f"bomb{number}.bmp", rle_bmp())) for number in range(64)]
    assert sum(len(data) for _, (_, data) in bombs) < 80_000
    one_bomb_s = cpu_seconds_to_expand(rle_bmp())
    before = cpu_seconds(served.process.pid)
    response = post(served.url, "predict_batch", files=bombs)
    spent = cpu_seconds(served.process.pid) - before
    body = assert_json_error(response, 400)
    assert body["index"] == 0
    assert "'bomb0.bmp': upload is a BMP with RLE8 compression, which is refused" in body["error"]
    assert spent < one_bomb_s, (spent, one_bomb_s)
    answer = post(served.url, "predict", files={"image": image_file(probe_images[0])})
    assert answer.status_code == 200, answer.text
