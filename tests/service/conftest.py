"""Shared fixtures for the service tests: one real model, trained, exported and served.

The model is the suite's one trained and exported run (``tests/conftest.py``: shapes
dataset, ``convtune fit``, ``convtune export`` into a private BentoML home); here it is
served by ``bentoml serve`` on a free local port, and the CLI and the server run as
subprocesses, as they would for a user: real files, real HTTP.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from helpers import reference_results
from PIL import Image

from convtune.benchmarks.servers import free_port, running_server, stop
from convtune.data.synthetic import make_shapes_dataset

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 48  # probe images; the eval transform resizes them to the model's size


@dataclass(frozen=True)
class Exported:
    """A trained run, its artifact, and the BentoML home holding it as a model."""

    root: Path
    run_dir: Path
    artifact_dir: Path
    bentoml_home: Path
    tag: str
    classes: tuple[str, ...]
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 300, **env: str) -> str:
        """Run ``python ARGS`` in the repository root; return stdout, fail on error."""
        result = subprocess.run(
            [sys.executable, *args],
            cwd=REPO,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout


def subprocess_env(bentoml_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CONVTUNE_MODEL"}
    env.update(
        BENTOML_HOME=str(bentoml_home),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    return env


@pytest.fixture(scope="session")
def exported(
    trained_run: Path,
    exported_model: str,
    bentoml_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Exported:
    """The suite's trained run (tests/conftest.py), exported as ``convtune`` into the store."""
    artifact_dir = trained_run / "artifact"
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    return Exported(
        root=tmp_path_factory.mktemp("convtune-service"),
        run_dir=trained_run,
        artifact_dir=artifact_dir,
        bentoml_home=bentoml_home,
        tag=exported_model,
        classes=tuple(manifest["classes"]),
        env=subprocess_env(bentoml_home),
    )


@pytest.fixture(scope="session")
def probe_images(exported: Exported) -> list[Path]:
    """Nine test images: six generated PNGs, then JPEG, translucent RGBA and gray versions."""
    root = make_shapes_dataset(exported.root / "probe", per_class=2, size=IMAGE_SIZE, seed=7)
    pngs = sorted(root.glob("*/*.png"))
    extra = exported.root / "probe-extra"
    extra.mkdir()
    Image.open(pngs[0]).save(extra / "jpeg.jpg", quality=90)
    translucent = Image.open(pngs[2]).convert("RGBA")
    translucent.putalpha(160)
    translucent.save(extra / "rgba.png")
    Image.open(pngs[4]).convert("L").save(extra / "gray.png")
    return [*pngs, extra / "jpeg.jpg", extra / "rgba.png", extra / "gray.png"]


@pytest.fixture(scope="session")
def cli_results(exported: Exported, probe_images: list[Path]) -> list[dict]:
    """``convtune predict`` on the probe images: the numbers the service must reproduce."""
    out = exported.run(
        "-m", "convtune", "predict", str(exported.artifact_dir), *map(str, probe_images),
        "--top-k", "99",
    )  # fmt: skip
    return json.loads(out)["results"]


@pytest.fixture(scope="session")
def expected_results(exported: Exported, probe_images: list[Path]) -> list[dict]:
    """The probe images' answers computed without convtune's inference code
    (``helpers.reference_results``): what the CLI and the service must both give."""
    return reference_results(exported.artifact_dir, probe_images)


@dataclass(frozen=True)
class Served:
    """A running ``bentoml serve``: its base URL, its process and the log it writes."""

    url: str
    process: subprocess.Popen
    log: Path


def serve_command(port: int) -> list[str]:
    """``bentoml serve`` of the repository's service on a local port."""
    service = "convtune.service.service:Convtune"
    return [sys.executable, "-m", "bentoml", "serve", service, "--host", "127.0.0.1",
            "--port", str(port)]  # fmt: skip


def server_env(exported: Exported, name: str, env: dict[str, str]) -> dict[str, str]:
    """The environment of server ``name``: a BentoML home of its own that shares the suite's
    model store. ``bentoml serve`` empties its home's metrics directory when it starts, so
    servers sharing one home would erase each other's ``/metrics`` counts."""
    home = exported.root / f"{name}-home"
    if not home.exists():
        home.mkdir()
        (home / "models").symlink_to(exported.bentoml_home / "models", target_is_directory=True)
    return {**exported.env, "BENTOML_HOME": str(home), **env}


@contextlib.contextmanager
def serving(exported: Exported, name: str, **env: str) -> Iterator[Served]:
    """``bentoml serve service.service:Convtune`` on a free local port, with ``env`` added."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = exported.root / f"{name}.log"
    with running_server(
        serve_command(port),
        ready_url=f"{url}/readyz",
        log_path=log_path,
        env=server_env(exported, name, env),
        cwd=REPO,
    ) as process:
        yield Served(url, process, log_path)


def refused_start(exported: Exported, name: str, error: str, **env: str) -> str:
    """Start ``bentoml serve`` with ``env`` added, expecting the service to refuse to start:
    wait until its log shows ``error``, check that ``/readyz`` does not answer 200, stop it,
    and return the log."""
    port = free_port()
    log_path = exported.root / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            serve_command(port),
            cwd=REPO,
            env={**exported.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ready() -> bool:
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
        return False

    try:
        deadline = time.monotonic() + 180  # a backstop: the log line is what is waited for
        while error not in log_path.read_text(errors="replace"):
            assert not ready(), f"the service started:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"no {error!r} in:\n{log_path.read_text()}"
            time.sleep(0.2)
        assert not ready(), "a service that failed to start says it is ready"
    finally:
        stop(process)
    return log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def start_server(exported: Exported) -> Callable[..., contextlib.AbstractContextManager[Served]]:
    """``start_server(name, **env)``: another server of the exported model, for a test."""
    return functools.partial(serving, exported)


@pytest.fixture(scope="session")
def start_refused(exported: Exported) -> Callable[..., str]:
    """``start_refused(name, error, **env)``: a server that must refuse to start (its log)."""
    return functools.partial(refused_start, exported)


@pytest.fixture(scope="session")
def served(exported: Exported) -> Iterator[Served]:
    """The suite's server, with the default limits (what a user gets)."""
    with serving(exported, "serve") as server:
        yield server


@pytest.fixture(scope="session")
def server(served: Served) -> str:
    """Base URL of the suite's server."""
    return served.url
