"""Helpers shared by the tests: generated images, requests, the answers a model must give.

Imported as ``helpers``: pytest puts ``tests/`` (it holds a ``conftest.py`` and no
``__init__.py``) on ``sys.path``. Every image is generated in memory: the tests own their
corpus.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import http.client
import io
import json
import select
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image, ImageDraw

from convtune.data.images import decode_rgb
from convtune.data.preprocessing import Preprocessing, build_eval_transform, eval_decode_size

TOLERANCE = 1e-5  # onnxruntime may sum in another order when requests share a batch
BACKSTOP_S = 30.0  # a wait this long means the code under test hangs: fail instead
LOAD_BACKSTOP_S = 600.0  # a load run of a few thousand requests that lasts this long hangs


def post(url: str, route: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}/{route}", timeout=60, **kwargs)


def address(url: str) -> tuple[str, int]:
    """(host, port) of a base URL such as ``http://127.0.0.1:8000``."""
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


@dataclass(frozen=True)
class RawAnswer:
    """An HTTP answer read off a raw socket, and whether the server closed it after."""

    status: int
    body: bytes
    closed: bool

    def json(self) -> Any:
        return json.loads(self.body)

    @classmethod
    def read(cls, client: socket.socket) -> RawAnswer:
        response = http.client.HTTPResponse(client)
        response.begin()
        body = response.read()
        return cls(response.status, body, closed=not still_answers(client))


# Asked on a connection after its answer: an open connection answers it, a closed one ends.
# Waiting instead for the server to close would need a timeout, and a slow server would then
# read as one that keeps the connection open.
NEXT_REQUEST = b"GET /livez HTTP/1.1\r\nHost: test\r\n\r\n"


def still_answers(client: socket.socket) -> bool:
    """Whether the server still serves on ``client``: it answers another request."""
    client.settimeout(BACKSTOP_S)
    try:
        client.sendall(NEXT_REQUEST)
        return client.recv(1) != b""
    except (ConnectionResetError, BrokenPipeError):
        return False


def raw_request(url: str, data: bytes, *, timeout: float = 30) -> RawAnswer:
    """Send ``data`` as it is on a new connection and read the answer."""
    with socket.create_connection(address(url), timeout=timeout) as client:
        client.sendall(data)
        return RawAnswer.read(client)


def trickle(
    client: socket.socket, *, every_s: float, backstop_s: float, byte: bytes = b"x"
) -> RawAnswer:
    """Send ``byte`` every ``every_s`` until the server answers; then read its answer."""
    deadline = time.monotonic() + backstop_s
    while not select.select([client], [], [], every_s)[0]:
        assert time.monotonic() < deadline, "the server never answered the slow client"
        client.sendall(byte)
    return RawAnswer.read(client)


def encode(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def png_bytes(size: int = 32) -> bytes:
    return encode(Image.new("RGB", (size, size), (200, 30, 30)), "PNG")


def drawing(width: int = 64, height: int = 40) -> Image.Image:
    """A red triangle off-center on white: rotating or mirroring it changes the pixels."""
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).polygon(
        [(width // 12, height - 4), (width // 2, 4), (2 * width // 3, height - 4)],
        fill=(200, 30, 30),
    )
    return image


def huge_canvas_png(width: int = 8000, height: int = 8000) -> bytes:
    """A valid PNG header that declares a ``width`` x ``height`` canvas, in 45 bytes.

    The default, 64 million pixels, is over the service's limit (40 million) and under
    Pillow's own decompression-bomb guard (89 million), so only the service's check can
    refuse it.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def loadgen_args(
    url: str, images: Sequence[Path], *, concurrency: int, requests: int, server_pid: int,
    summary: Path,
) -> list[str]:  # fmt: skip
    """``python`` arguments of ``convtune.benchmarks.loadgen``: ``concurrency`` keep-alive
    clients posting ``images`` in turn to /predict until ``requests`` are answered, the
    summary written to ``summary``. A run is bounded by its count; its duration is only a
    backstop against a server that stops answering."""
    return [
        "-m", "convtune.benchmarks.loadgen", "--url", url, "--route", "/predict",
        *[arg for path in images for arg in ("--image", str(path))],
        "--concurrency", str(concurrency), "--requests", str(requests),
        "--duration", str(LOAD_BACKSTOP_S), "--server-pid", str(server_pid),
        "--json", str(summary),
    ]  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """CPU time used so far by ``pid`` and its children (BentoML serves from a child):
    the work a server did, which other processes on the cores do not change."""
    root = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [root, *root.children(recursive=True)])


def image_file(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "application/octet-stream")


def assert_prediction(result: dict, classes: tuple[str, ...], top_k: int) -> None:
    """One image's answer is well formed: every class, a distribution, a sorted top-k."""
    probabilities = result["probabilities"]
    assert list(probabilities) == list(classes)
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(0.0 <= p <= 1.0 for p in probabilities.values())
    assert result["label"] == max(probabilities, key=probabilities.get)
    ranked = result["top_k"]
    assert len(ranked) == min(top_k, len(classes))
    assert [entry["probability"] for entry in ranked] == sorted(
        (entry["probability"] for entry in ranked), reverse=True
    )
    assert ranked[0]["label"] == result["label"]
    assert all(probabilities[entry["label"]] == entry["probability"] for entry in ranked)


def assert_same_numbers(result: dict, expected: dict) -> None:
    assert result["label"] == expected["label"]
    for name, probability in expected["probabilities"].items():
        assert result["probabilities"][name] == pytest.approx(probability, abs=TOLERANCE)


def assert_json_error(response: httpx.Response, status: int) -> dict:
    """``response`` is ``status`` with a JSON object whose ``error`` is a readable sentence."""
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    assert len(body["error"]) > 10, body
    return body


def request_log(log: Path, event: str = "request") -> list[dict]:
    """The service's JSON request-log lines of ``event`` in a server log (BentoML's lines
    are skipped)."""
    records = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(f'{{"event": "{event}"'):
            records.append(json.loads(line))
    return records


def assert_concurrent_answers(
    url: str,
    probe_images: list[Path],
    expected: list[dict],
    *,
    singles: int,
    batches: int,
    repeat: int,
    workers: int,
) -> None:
    """Send ``singles`` one-image requests and ``batches`` requests of the probe images
    ``repeat`` times over, all at once; each answer must be its own images' ``expected``."""

    def one(index: int) -> tuple[int, dict]:
        response = post(url, "predict", files={"image": image_file(probe_images[index])})
        assert response.status_code == 200, response.text
        return index, response.json()

    def batch() -> list[dict]:
        files = [("images", image_file(path)) for path in probe_images * repeat]
        response = post(url, "predict_batch", files=files)
        assert response.status_code == 200, response.text
        return response.json()["results"]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = [pool.submit(batch) for _ in range(batches)]
        answers = list(pool.map(one, [i % len(probe_images) for i in range(singles)]))
        batched = [future.result() for future in pending]
    for index, result in answers:
        assert_same_numbers(result, expected[index])
    for results in batched:
        for result, want in zip(results, expected * repeat, strict=True):
            assert_same_numbers(result, want)


def reference_results(
    artifact_dir: Path,
    images: Sequence[bytes | Path],
    *,
    views: str = "none",
    temperature: float | None = None,
) -> list[dict]:
    """What an artifact must answer for ``images``, computed here, not by
    ``convtune.models.inference``: onnxruntime's logits of each view of the eval view,
    softmax(logits / T) with the manifest's temperature T for those views (or
    ``temperature``), averaged over the views. Decoding and the eval view are the
    library's (training uses them too)."""
    import onnxruntime

    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    if temperature is None:  # a view set the run fitted no temperature for: the single view's
        temperature = manifest.get("temperatures", {}).get(views, manifest["temperature"])
    preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
    transform = build_eval_transform(preprocessing)
    draft = eval_decode_size(preprocessing)  # as the CLI and the service decode JPEGs
    pixels = np.stack(
        [transform(image=decode_rgb(image, draft_size=draft))["image"] for image in images]
    )
    session = onnxruntime.InferenceSession(
        str(artifact_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    [input_name] = [node.name for node in session.get_inputs()]
    mirrors = {"none": (False,), "flip": (False, True), "d4": (False, True)}[views]
    turns = range(4) if views == "d4" else range(1)
    each_view = []
    for mirrored in mirrors:
        for quarter_turns in turns:
            view = np.rot90(pixels[..., ::-1] if mirrored else pixels, quarter_turns, axes=(2, 3))
            # The manifest names the logits; the graph gives feature maps after them.
            [logits] = session.run(
                [manifest["output"]["name"]], {input_name: np.ascontiguousarray(view)}
            )
            scaled = logits.astype(np.float64) / temperature
            exp = np.exp(scaled - scaled.max(axis=1, keepdims=True))
            each_view.append(exp / exp.sum(axis=1, keepdims=True))
    classes = manifest["classes"]
    return [
        {
            "label": classes[int(np.argmax(row))],
            "probabilities": dict(zip(classes, row.tolist(), strict=True)),
        }
        for row in np.mean(each_view, axis=0)
    ]


def largest_difference(results: list[dict], others: list[dict]) -> float:
    """The largest difference between two answers' probabilities for any image and class."""
    return max(
        abs(result["probabilities"][name] - other["probabilities"][name])
        for result, other in zip(results, others, strict=True)
        for name in result["probabilities"]
    )


class Clock:
    """A stand-in for the ``time`` module of ``service.batching``: the queue's clock, which
    the test moves by setting ``now``."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def queued(batcher: Any) -> int:
    """Requests a ``service.batching.GreedyBatcher`` holds prepared, waiting for a call."""
    return len(batcher._queue)


async def until(condition: Callable[[], bool]) -> None:
    """Let the event loop and the worker threads run until ``condition()`` holds; the
    deadline is only a backstop, never what a test waits for."""
    deadline = time.monotonic() + BACKSTOP_S
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        await asyncio.sleep(0.001)


def fit_refused(args: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> str:
    """``convtune fit``'s error for ``args``, checking that it came before any work: no run
    directory, and the data (a path that does not exist) never looked at."""
    from convtune.training.cli import main

    run_dir = tmp_path / "never"
    fit = ["fit", "--data", str(tmp_path / "no-data"), "--model", "test_resnet"]
    assert main([*fit, "--out", str(run_dir), *args]) == 2
    assert not run_dir.exists()
    return capsys.readouterr().err


# The training stack: commands that only read an artifact or a dataset must not load it.
HEAVY_MODULES = ("torch", "lightning", "timm", "albumentations")


def loaded_after(
    arguments: list[str], heavy: tuple[str, ...] = HEAVY_MODULES
) -> tuple[int, list[str], str]:
    """``convtune ARGUMENTS`` in a fresh interpreter: its status, the ``heavy`` modules it
    loaded, and its stdout."""
    code = (
        "import json, sys\n"
        "from convtune.training.cli import main\n"
        f"status = main({arguments!r})\n"
        f"print(json.dumps([status, [name for name in {heavy!r} if name in sys.modules]]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    *answer, last = result.stdout.strip().splitlines()
    status, loaded = json.loads(last)
    return status, loaded, "\n".join(answer)


@dataclass(frozen=True)
class ServiceDeclaration:
    """service/service.py as its source declares it, read rather than imported (importing
    it loads a model): the service class's name, its ``@bentoml.service`` arguments, and
    the module's constants."""

    name: str
    arguments: dict[str, Any]
    constants: dict[str, Any]


@functools.cache  # the documented-defaults checks each ask for it
def service_declaration() -> ServiceDeclaration:
    tree = ast.parse((Path(__file__).resolve().parents[1] / "service" / "service.py").read_text())
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    [(name, arguments)] = [
        (node.name, {k.arg: ast.literal_eval(k.value) for k in decorator.keywords})
        for node in tree.body
        if isinstance(node, ast.ClassDef)
        for decorator in node.decorator_list
        if isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == "bentoml.service"
    ]
    return ServiceDeclaration(name, arguments, constants)
