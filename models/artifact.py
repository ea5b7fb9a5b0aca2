"""What convtune keeps on disk: the run directory a fit fills and the artifact exported
from it. Every file name of both lives here, and the artifact's manifest has its one
writer and one reader here.

A run directory, everything needed to resume, evaluate and export a run::

    config.yaml          CONFIG_FILE: the resolved configuration (training.config)
    split.json           SPLIT_FILE: the exact train/val/test images and the class list, in
                         the model's output order (data.splits); resume and evaluate reuse it
    logs/version_N/      LOGS_DIR: LOG_METRICS_FILE per attempt (resuming starts a version)
    probe.json           PROBE_HISTORY_FILE, with --cache-features: the linear probe's
                         per-epoch history (training.history)
    checkpoints/         CHECKPOINT_DIR: BEST_CHECKPOINT and LAST_CHECKPOINT (Lightning, for
                         --resume)
    model.safetensors    MODEL_WEIGHTS: the best weights (by the monitored val metric)
    model.json           MODEL_DESCRIPTION: how to rebuild the model, its temperatures and
                         val metrics
    metrics.json         METRICS_FILE, with a test part: the test metrics (training.report)
    report.html          REPORT_FILE, with a test part: the evaluation report
    artifact/            ARTIFACT_DIR: what ``convtune export`` writes

An artifact, one directory that describes and verifies itself::

    model.onnx            ONNX_FILE: the graph, dynamic batch axis, pixels in, logits out
    weights.safetensors   WEIGHTS_FILE: the fine-tuned weights, for further training
    manifest.json         MANIFEST_FILE: everything needed to use the two (:class:`Manifest`)

The manifest records the sha256 of each file and every reader checks them, so a damaged or
tampered artifact is refused rather than served. No pickle anywhere.

The run directory's names live next to the artifact's because export turns the one into
the other, and in ``models`` because the service reads artifacts and may import ``data``
and ``models`` only. This module must not import torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from convtune.data.preprocessing import Preprocessing

CONFIG_FILE = "config.yaml"
SPLIT_FILE = "split.json"
LOGS_DIR = "logs"
LOG_METRICS_FILE = "metrics.csv"  # Lightning's CSVLogger names it
PROBE_HISTORY_FILE = "probe.json"
CHECKPOINT_DIR = "checkpoints"
BEST_CHECKPOINT = "best"  # Lightning adds ".ckpt"
LAST_CHECKPOINT = "last.ckpt"  # Lightning's name for its save_last checkpoint
MODEL_WEIGHTS = "model.safetensors"
MODEL_DESCRIPTION = "model.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
ARTIFACT_DIR = "artifact"

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
ARTIFACT_FILES = (ONNX_FILE, WEIGHTS_FILE)
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
# The graph's interface as the manifest states it, for readers other than convtune.
_INPUT = {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32"}
_OUTPUT = {"name": OUTPUT_NAME, "kind": "logits"}


class ArtifactError(ValueError):
    """The artifact is missing, malformed or does not match its recorded hashes."""


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: :meth:`to_json` writes it, :meth:`from_json` reads it.

    ``temperatures`` are by test-time view set (``models.inference.VIEW_SETS``), always with
    the single view's (``none``), which the file also holds as ``temperature``;
    ``serving_tta`` is the view set the service averages over; ``files`` the sha256 of each
    of ``ARTIFACT_FILES``, filled in by :func:`write_manifest`.
    """

    architecture: str
    classes: tuple[str, ...]
    head: Mapping[str, Any]  # models.factory.HeadConfig's fields
    preprocessing: Preprocessing
    temperatures: Mapping[str, float]
    serving_tta: str
    val_metrics: Mapping[str, Any]
    training_config: Mapping[str, Any]  # training.config.FitConfig's fields
    versions: Mapping[str, str | None]  # of the packages that made the artifact
    created: str  # ISO 8601, UTC
    files: Mapping[str, str] = field(default_factory=dict)

    @property
    def temperature(self) -> float:
        """The single view's temperature."""
        return self.temperatures["none"]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "architecture": self.architecture,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "head": dict(self.head),
            "preprocessing": self.preprocessing.to_dict(),
            "input": _INPUT,
            "output": _OUTPUT,
            "temperature": self.temperature,
            "temperatures": dict(self.temperatures),
            "serving": {"tta": self.serving_tta},
            "metrics": {"val": dict(self.val_metrics)},
            "training_config": dict(self.training_config),
            "versions": dict(self.versions),
            "created": self.created,
            "files": dict(self.files),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Manifest:
        """Read a manifest of ``SCHEMA_VERSION``; raise :class:`ArtifactError` if it is not
        one. Manifests from before test-time views have no ``temperatures`` and
        ``serving``: their single-view temperature, served without views."""
        version = raw.get("schema_version") if isinstance(raw, Mapping) else None
        if version != SCHEMA_VERSION:
            raise ArtifactError(f"schema_version {version!r}; this convtune reads {SCHEMA_VERSION}")
        try:
            temperature = float(raw["temperature"])
            temperatures = {"none": temperature, **raw.get("temperatures", {})}
            manifest = cls(
                architecture=str(raw["architecture"]),
                classes=tuple(str(name) for name in raw["classes"]),
                head=dict(raw["head"]),
                preprocessing=Preprocessing.from_dict(raw["preprocessing"]),
                temperatures={str(views): float(t) for views, t in temperatures.items()},
                serving_tta=str(raw.get("serving", {}).get("tta", "none")),
                val_metrics=dict(raw["metrics"]["val"]),
                training_config=dict(raw["training_config"]),
                versions=dict(raw["versions"]),
                created=str(raw["created"]),
                files={str(name): str(digest) for name, digest in raw["files"].items()},
            )
            stated = {key: raw[key] for key in ("num_classes", "input", "output")}
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ArtifactError(f"incomplete or malformed: {error!r}") from error
        # Written for other readers; a manifest that disagrees describes some other graph.
        expected = {"num_classes": manifest.num_classes, "input": _INPUT, "output": _OUTPUT}
        if stated != expected:
            raise ArtifactError(
                f"states {stated}; its classes and a convtune graph give {expected}"
            )
        return manifest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` with the sha256 of every artifact file filled in."""
    files = {name: sha256_file(directory / name) for name in ARTIFACT_FILES}
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps(replace(manifest, files=files).to_json(), indent=2) + "\n")
    return path


def read_manifest(directory: str | Path) -> Manifest:
    """Read and verify an artifact directory; raise :class:`ArtifactError` on any mismatch."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a convtune artifact (no {MANIFEST_FILE})")
    try:
        manifest = Manifest.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path} is not valid JSON: {error}") from error
    except ArtifactError as error:
        raise ArtifactError(f"{path}: {error}") from error
    for name in ARTIFACT_FILES:
        file = directory / name
        if name not in manifest.files or not file.is_file():
            raise ArtifactError(f"artifact {directory} is missing {name}")
        actual = sha256_file(file)
        if actual != manifest.files[name]:
            raise ArtifactError(
                f"{file} does not match its recorded sha256 (expected "
                f"{manifest.files[name][:12]}…, got {actual[:12]}…): the artifact is damaged "
                "or was modified"
            )
    return manifest


def locate_artifact(reference: str) -> Path:
    """``reference`` is an artifact directory or a ``NAME[:VERSION]`` in the BentoML store."""
    path = Path(reference)
    if (path / MANIFEST_FILE).is_file():
        return path
    if path.exists():
        raise ArtifactError(f"{path} is not a convtune artifact (no {MANIFEST_FILE})")
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return Path(bentoml.models.get(reference).path)
    except (NotFound, ValueError) as error:
        raise ArtifactError(
            f"{reference!r} is neither an artifact directory nor a model in the BentoML "
            f"store ({error}); see `bentoml models list`"
        ) from error
