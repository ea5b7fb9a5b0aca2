"""BentoML's own clients against a running service: the answers a plain multipart POST gets.

``bentoml.SyncHTTPClient`` and ``AsyncHTTPClient`` build their methods from
``/schema.json`` and send a multipart form; the service still decodes, limits and refuses
that form itself, so a refusal reaches the client as BentoML's exception carrying our
JSON error. The calls here are the README's "Calling the service" examples.
"""

from __future__ import annotations

import asyncio
import io
import json
from http import HTTPStatus
from pathlib import Path

import bentoml
import httpx
import pytest
from bentoml.exceptions import InvalidArgument
from helpers import assert_json_error, image_file, post
from PIL import Image

pytestmark = pytest.mark.slow


def httpx_predict(server: str, path: Path, **data: str) -> dict:
    response = post(server, "predict", files={"image": image_file(path)}, data=data)
    assert response.status_code == 200, response.text
    return response.json()


def httpx_predict_batch(server: str, paths: list[Path], **data: str) -> dict:
    files = [("images", image_file(path)) for path in paths]
    response = post(server, "predict_batch", files=files, data=data)
    assert response.status_code == 200, response.text
    return response.json()


def test_schema_describes_the_routes_to_bentoml_clients(server) -> None:
    response = httpx.get(f"{server}/schema.json", timeout=30)
    assert response.status_code == 200, response.text
    schema = response.json()
    # Still BentoML's own document (its name, the mounted paths), with our routes added.
    assert (schema["name"], schema["type"]) == ("Convtune", "service")
    assert {"/predict", "/predict_batch"} <= set(schema["paths"])
    routes = {route["name"]: route for route in schema["routes"]}
    assert set(routes) == {"predict", "predict_batch", "explain"}
    single, batch = routes["predict"]["input"], routes["predict_batch"]["input"]
    assert routes["predict"]["route"] == "/predict" and single["required"] == ["image"]
    assert single["properties"]["image"]["type"] == "file"
    assert single["properties"]["top_k"]["default"] == 5
    assert batch["properties"]["images"]["items"]["type"] == "file"
    assert batch["properties"]["images"]["maxItems"] == 64


def test_sync_client_answers_as_httpx(server, probe_images) -> None:
    with bentoml.SyncHTTPClient(server) as client:
        assert "multipart field `image`" in client.predict.__doc__
        for path in probe_images:
            assert client.predict(image=path, top_k=3) == httpx_predict(server, path, top_k="3")
        # A PIL image opened from a file or from bytes, a path as text, the default top_k.
        path = probe_images[6]
        with Image.open(path) as image:
            assert client.predict(image=image) == httpx_predict(server, path)
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            assert client.predict(image=image) == httpx_predict(server, path)
        assert client.predict(image=str(path)) == httpx_predict(server, path)
        answer = client.predict_batch(images=probe_images, top_k=3)
        assert answer == httpx_predict_batch(server, probe_images, top_k="3")
        assert len(answer["results"]) == len(probe_images)


def test_async_client_answers_as_httpx(server, probe_images) -> None:
    async def call() -> tuple[dict, dict]:
        async with bentoml.AsyncHTTPClient(server) as client:
            single = await client.predict(image=probe_images[0], top_k=3)
            batch = await client.predict_batch(images=probe_images[:4], top_k=3)
            return single, batch

    single, batch = asyncio.run(call())
    assert single == httpx_predict(server, probe_images[0], top_k="3")
    assert batch == httpx_predict_batch(server, probe_images[:4], top_k="3")


def test_a_refusal_raises_the_services_error(server, probe_images, tmp_path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not an image at all")
    expected = assert_json_error(post(server, "predict", files={"image": image_file(bad)}), 400)
    assert "notes.png" in expected["error"]
    with bentoml.SyncHTTPClient(server) as client:
        with pytest.raises(InvalidArgument) as raised:
            client.predict(image=bad)
        assert raised.value.error_code == HTTPStatus.BAD_REQUEST
        assert json.loads(str(raised.value)) == expected
        # A bad image in a batch is named by its index.
        with pytest.raises(InvalidArgument) as raised:
            client.predict_batch(images=[probe_images[0], bad])
        assert json.loads(str(raised.value))["index"] == 1
        # A URL is sent as text, in a form without files: refused, never fetched
        # (BentoML's own input handling would download it).
        with pytest.raises(InvalidArgument, match="the image in the file field 'image'"):
            client.predict(image="http://127.0.0.1:9/cat.png")
        with pytest.raises(InvalidArgument, match="top_k must be a positive integer"):
            client.predict(image=probe_images[0], top_k=0)


def test_async_client_raises_the_services_error(server, tmp_path) -> None:
    bad = tmp_path / "empty.jpg"
    bad.write_bytes(b"")
    expected = assert_json_error(post(server, "predict", files={"image": image_file(bad)}), 400)

    async def call() -> dict:
        async with bentoml.AsyncHTTPClient(server) as client:
            return await client.predict(image=bad)

    with pytest.raises(InvalidArgument) as raised:
        asyncio.run(call())
    assert json.loads(str(raised.value)) == expected
