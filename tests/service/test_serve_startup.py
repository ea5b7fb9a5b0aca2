"""A service that cannot serve ends its start: ``bentoml serve`` exits with a non-zero status
and the reason on stderr, so an orchestrator sees a failed start, instead of BentoML
restarting a failing worker every ~10 s for ever, or looking for the model on BentoCloud.

Each test starts a real ``bentoml serve`` of the suite's exported model (tests/conftest.py),
with one thing wrong.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, Exported, serve_command

from convtune.benchmarks.servers import free_port
from convtune.models.artifact import sha256_file

pytestmark = pytest.mark.slow

# A start that fails exits in about a second, under load in several; a crash loop never does.
EXIT_WITHIN_S = 60


def failed_start(exported: Exported, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """``bentoml serve`` with ``env`` added, which must exit by itself (the process and the
    seconds it took)."""
    started = time.monotonic()
    result = subprocess.run(
        serve_command(free_port()),
        cwd=REPO,
        env={**exported.env, **env},
        capture_output=True,
        text=True,
        timeout=EXIT_WITHIN_S,
    )
    return result, time.monotonic() - started


def assert_refused(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode != 0, result.stderr
    assert f"convtune service: error: {message}" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("CONVTUNE_MAX_PIXELS", "ten", "CONVTUNE_MAX_PIXELS must be a positive integer, not 'ten'"),
        ("CONVTUNE_MAX_UPLOAD_BYTES", "0", "CONVTUNE_MAX_UPLOAD_BYTES must be a positive"),
        ("CONVTUNE_INFERENCE_LANES", "-1", "CONVTUNE_INFERENCE_LANES must be a whole number"),
    ],
)
def test_a_bad_setting_ends_the_start(exported, setting: str, value: str, message: str) -> None:
    result, _ = failed_start(exported, **{setting: value})
    assert_refused(result, message)


@dataclass
class Listener:
    """A stand-in for BentoCloud on a local port, and the requests it received."""

    url: str
    received: list[bytes] = field(default_factory=list)


@pytest.fixture
def cloud() -> Iterator[Listener]:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    listener = Listener(f"http://127.0.0.1:{server.getsockname()[1]}")

    def accept() -> None:
        while server.fileno() != -1:
            try:
                connection, _ = server.accept()
            except OSError:  # the timeout, or the socket closed
                continue
            with connection:
                listener.received.append(connection.recv(1024))

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener
    server.close()
    thread.join(timeout=5)


def test_a_model_missing_from_the_store_is_not_looked_for_on_bentocloud(exported, cloud):
    # With BentoCloud credentials BentoML pulls a model it does not find locally: these
    # point it at a local stand-in, which must never hear from the service.
    result, seconds = failed_start(
        exported,
        CONVTUNE_MODEL="no-such-model:v1",
        BENTO_CLOUD_API_KEY="not-a-key",
        BENTO_CLOUD_API_ENDPOINT=cloud.url,
    )
    store = exported.bentoml_home / "models"
    assert_refused(result, f"no model 'no-such-model:v1' in the BentoML store {store}")
    assert cloud.received == []
    print(f"refused in {seconds:.1f} s")


def stored_copy(exported: Exported, home: Path) -> Path:
    """A private store holding a copy of the exported model: its directory there."""
    shutil.copytree(exported.bentoml_home / "models", home / "models", symlinks=True)
    return home / "models" / exported.tag.replace(":", "/")


def edit_manifest(model_dir: Path, **changes: object) -> str:
    """Change ``model_dir``'s manifest.json; return the sha256 it had."""
    path = model_dir / "manifest.json"
    before = sha256_file(path)
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))
    return before


def test_a_manifest_changed_in_the_store_is_refused(exported, tmp_path) -> None:
    model_dir = stored_copy(exported, tmp_path / "bentoml")
    edit_manifest(model_dir, temperature=1.5, temperatures={"none": 1.5})  # plausible values
    result, _ = failed_start(exported, BENTOML_HOME=str(tmp_path / "bentoml"))
    assert_refused(result, f"{model_dir / 'manifest.json'} does not match the sha256 the store")


def test_a_model_with_temperature_zero_does_not_start(exported, tmp_path) -> None:
    # Its manifest and the store's record edited together: the values are what is refused.
    model_dir = stored_copy(exported, tmp_path / "bentoml")
    before = edit_manifest(model_dir, temperature=0.0, temperatures={"none": 0.0})
    record = model_dir / "model.yaml"
    record.write_text(record.read_text().replace(before, sha256_file(model_dir / "manifest.json")))
    result, _ = failed_start(exported, BENTOML_HOME=str(tmp_path / "bentoml"))
    manifest = model_dir / "manifest.json"
    assert_refused(result, f"{manifest}: temperature must be a finite number > 0, not 0.0")
