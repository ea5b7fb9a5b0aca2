"""The model artifact: one directory that describes and verifies itself.

Layout::

    model.onnx            the graph, dynamic batch axis, outputs logits
    weights.safetensors   the fine-tuned weights, for further training
    manifest.json         everything needed to use the two files (see ``build_manifest``)

``manifest.json`` records the sha256 of each file and every reader checks them, so a
damaged or tampered artifact is refused rather than served. No pickle anywhere.
This module must not import torch: the service reads artifacts with it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convtune.data.transforms import Preprocessing

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
ARTIFACT_FILES = (ONNX_FILE, WEIGHTS_FILE)


class ArtifactError(ValueError):
    """The artifact is missing, malformed or does not match its recorded hashes."""


@dataclass(frozen=True)
class Manifest:
    """The parts of ``manifest.json`` that code reads; the rest is for people."""

    architecture: str
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    temperature: float  # the single view's
    temperatures: Mapping[str, float]  # by test-time view set (models.inference.VIEW_SETS)
    serving_tta: str  # the view set the service averages over
    raw: dict[str, Any]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` with the sha256 of every artifact file filled in."""
    files = {name: sha256_file(directory / name) for name in ARTIFACT_FILES}
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps({**manifest, "files": files}, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(directory: str | Path) -> Manifest:
    """Read and verify an artifact directory; raise :class:`ArtifactError` on any mismatch."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a convtune artifact (no {MANIFEST_FILE})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path} is not valid JSON: {error}") from error
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema_version {raw.get('schema_version')!r}; this convtune reads "
            f"{SCHEMA_VERSION}"
        )
    recorded = raw.get("files", {})
    for name in ARTIFACT_FILES:
        file = directory / name
        if name not in recorded or not file.is_file():
            raise ArtifactError(f"artifact {directory} is missing {name}")
        actual = sha256_file(file)
        if actual != recorded[name]:
            raise ArtifactError(
                f"{file} does not match its recorded sha256 (expected {recorded[name][:12]}…, "
                f"got {actual[:12]}…): the artifact is damaged or was modified"
            )
    try:
        temperature = float(raw["temperature"])
        # Artifacts exported before test-time views had only the single view's temperature.
        temperatures = {"none": temperature, **raw.get("temperatures", {})}
        return Manifest(
            architecture=raw["architecture"],
            classes=tuple(raw["classes"]),
            preprocessing=Preprocessing.from_dict(raw["preprocessing"]),
            temperature=temperature,
            temperatures={str(views): float(t) for views, t in temperatures.items()},
            serving_tta=str(raw.get("serving", {}).get("tta", "none")),
            raw=raw,
        )
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{path} is incomplete or malformed: {error!r}") from error
