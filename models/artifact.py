"""What convtune keeps on disk: the run directory a fit fills and the artifact exported
from it. Every file name of both lives here, and so do the schemas of the two JSON files
that describe a model, each with its one writer and one reader: ``model.json``
(:class:`ModelDescription`) and ``manifest.json`` (:class:`Manifest`).

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
                         val metrics (:class:`ModelDescription`)
    metrics.json         METRICS_FILE, with a test part: the test metrics (training.report)
    report.html          REPORT_FILE, with a test part: the evaluation report
    artifact/            ARTIFACT_DIR: what ``convtune export`` writes
    tensorboard/         TENSORBOARD_DIR, with --logger tensorboard: its event files
    tracking.json        TRACKING_FILE, with --logger mlflow: the MLflow run's id, experiment
                         and tracking URI (training.tracking); the manifest's ``tracking``

An artifact, one directory that describes and verifies itself::

    model.onnx            ONNX_FILE: the graph, dynamic batch axis, pixels in, logits out
    explain.onnx          EXPLAIN_ONNX_FILE: the same network, also giving its class maps and
                          each stage's feature maps (manifest ``explain``)
    weights.safetensors   WEIGHTS_FILE: the fine-tuned weights, for further training
    manifest.json         MANIFEST_FILE: everything needed to use the others (:class:`Manifest`)

The explaining graph is a file of its own so that the logits' graph computes nothing else:
onnxruntime runs every node of a graph whatever outputs a call asks for.

The manifest records the sha256 of each file and every reader checks them, so a damaged or
tampered artifact is refused rather than served. No pickle anywhere.

The run directory's names live next to the artifact's because export turns the one into
the other, and in ``models`` because the service reads artifacts and may import ``data``
and ``models`` only. This module must not import torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import reprlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convtune.data.preprocessing import Preprocessing

if TYPE_CHECKING:
    import bentoml

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
TENSORBOARD_DIR = "tensorboard"
TRACKING_FILE = "tracking.json"

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
EXPLAIN_ONNX_FILE = "explain.onnx"
WEIGHTS_FILE = "weights.safetensors"
ARTIFACT_FILES = (ONNX_FILE, WEIGHTS_FILE)  # in every artifact; EXPLAIN_ONNX_FILE where exported
# BentoML's record of a stored model, beside its files; its metadata holds the manifest's
# sha256 under MANIFEST_DIGEST (training.export.register_in_store).
STORE_RECORD = "model.yaml"
MANIFEST_DIGEST = "manifest_sha256"
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
# The explaining graph's outputs beside the logits: the class activation maps, and each
# encoder stage's feature maps as ``stage_1`` ...
CLASS_MAPS_NAME = "class_maps"
STAGE_NAME = "stage_{}"
# The graph's interface as the manifest states it, for readers other than convtune.
_INPUT = {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32"}
_OUTPUT = {"name": OUTPUT_NAME, "kind": "logits"}


class ArtifactError(ValueError):
    """The artifact is missing, malformed or does not match its recorded hashes."""


class NotInStore(ArtifactError):
    """The local BentoML store has no model of that name and version."""


@dataclass(frozen=True)
class ModelStructure:
    """What ``models.factory.rebuild_model`` needs to build a model's untrained structure:
    a run's ``model.json`` and a checkpoint's hyperparameters hold it."""

    architecture: str  # timm model name
    num_classes: int
    head: Mapping[str, Any]  # models.factory.HeadConfig's fields
    preprocessing: Preprocessing

    def to_json(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "head": dict(self.head),
            "preprocessing": self.preprocessing.to_dict(),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ModelStructure:
        return cls(
            architecture=str(raw["architecture"]),
            num_classes=int(raw["num_classes"]),
            head=dict(raw["head"]),
            preprocessing=Preprocessing.from_dict(raw["preprocessing"]),
        )


@dataclass(frozen=True)
class ModelDescription:
    """A run's ``model.json``, beside its best weights: their structure, the temperatures
    fitted on val (by view set, always with the single view's, ``none``) and val metrics.

    The file is flat: the structure's keys, ``temperature`` (the single view's, which
    readers from before test-time views know), ``temperatures`` and ``val_metrics``.
    """

    structure: ModelStructure
    temperatures: Mapping[str, float]
    val_metrics: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            **self.structure.to_json(),
            "temperature": self.temperatures["none"],
            "temperatures": dict(self.temperatures),
            "val_metrics": dict(self.val_metrics),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ModelDescription:
        """Read a ``model.json``, also one from before temperatures were fitted (1.0) or
        fitted by view set (the single view's only); a ``classes`` key of older runs is
        left out: the class list is the split's."""
        temperature = float(raw.get("temperature", 1.0))
        temperatures = {"none": temperature, **raw.get("temperatures", {})}
        return cls(
            structure=ModelStructure.from_json(raw),
            temperatures={str(views): float(t) for views, t in temperatures.items()},
            val_metrics=dict(raw["val_metrics"]),
        )


def write_model_description(run_dir: Path, description: ModelDescription) -> Path:
    path = run_dir / MODEL_DESCRIPTION
    path.write_text(json.dumps(description.to_json(), indent=2))
    return path


def read_model_description(run_dir: Path) -> ModelDescription:
    """Read ``run_dir``'s ``model.json``; ``FileNotFoundError`` if it has none, ValueError
    if it is not one."""
    path = run_dir / MODEL_DESCRIPTION
    text = path.read_text()
    try:
        return ModelDescription.from_json(json.loads(text))
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is incomplete or malformed: {error!r}") from error


@dataclass(frozen=True, kw_only=True)
class FeatureVolume:
    """A volume of feature maps the encoder computes at the model's input size: ``channels``
    maps of ``height`` x ``width``, each cell ``stride`` input pixels apart, and the
    parameters and multiply-adds of the layers that compute it from the volume before.
    ``output`` names it among the graph's outputs (None: the graph does not give it)."""

    output: str | None
    channels: int
    stride: int
    height: int
    width: int
    parameters: int
    macs: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> FeatureVolume:
        output = raw.get("output")
        return cls(
            output=None if output is None else _checked_text("output", output),
            **{name: _whole(name, raw[name]) for name in _VOLUME_SIZES},
        )


_VOLUME_SIZES = ("channels", "stride", "height", "width", "parameters", "macs")


@dataclass(frozen=True, kw_only=True)
class ExplainOutputs:
    """Manifest ``explain``: what the ``graph`` file shows beside its logits.

    ``graph``: EXPLAIN_ONNX_FILE, or ONNX_FILE in artifacts whose one graph gave it all.
    ``stages``: the volume at the end of each stage timm's ``feature_info`` delimits, each
    a graph output. ``features``: the last volume, which the head's ``pooling`` averages to
    one feature vector; ``class_maps`` names the output that applies the head at each of
    its positions (None where the head is not one linear layer on an average: no exact
    CAM). ``head``: the parameters and multiply-adds after pooling.
    """

    graph: str
    class_maps: str | None
    stages: tuple[FeatureVolume, ...]
    features: FeatureVolume
    pooling: str
    head_parameters: int
    head_macs: int

    @property
    def output_names(self) -> list[str]:
        named = [self.class_maps, *(stage.output for stage in self.stages)]
        return [name for name in named if name is not None]

    def to_json(self) -> dict[str, Any]:
        return {
            "graph": self.graph,
            "class_maps": self.class_maps,
            "stages": [stage.to_json() for stage in self.stages],
            "features": self.features.to_json(),
            "pooling": self.pooling,
            "head": {"parameters": self.head_parameters, "macs": self.head_macs},
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ExplainOutputs:
        class_maps, graph = raw["class_maps"], raw.get("graph", ONNX_FILE)
        if graph not in (ONNX_FILE, EXPLAIN_ONNX_FILE):
            raise ArtifactError(
                f"explain.graph is {reprlib.repr(graph)}, not {ONNX_FILE} or {EXPLAIN_ONNX_FILE}"
            )
        return cls(
            graph=graph,
            class_maps=None if class_maps is None else _checked_text("class_maps", class_maps),
            stages=tuple(FeatureVolume.from_json(stage) for stage in raw["stages"]),
            features=FeatureVolume.from_json(raw["features"]),
            pooling=_checked_text("pooling", raw["pooling"]),
            head_parameters=_whole("head.parameters", raw["head"]["parameters"]),
            head_macs=_whole("head.macs", raw["head"]["macs"]),
        )


@dataclass(frozen=True, kw_only=True)
class Quantization:
    """Manifest ``quantization``: ONNX_FILE holds a ``precision`` graph (onnxruntime static
    quantization, QDQ, per-channel weights), its activation ranges calibrated by ``method``
    on ``calibration_images`` training images, and accepted on the validation split's
    ``validation_images``: ``agreement`` is the share whose top-1 class is the float
    graph's (at least ``min_agreement``), ``val`` each graph's metrics there (``float32``,
    and ``precision``'s). EXPLAIN_ONNX_FILE stays float32."""

    precision: str
    method: str
    calibration_images: int
    validation_images: int
    agreement: float
    min_agreement: float
    val: Mapping[str, Mapping[str, float]]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "val": {name: dict(m) for name, m in self.val.items()}}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Quantization:
        return cls(
            precision=_checked_text("precision", raw["precision"]),
            method=_checked_text("method", raw["method"]),
            calibration_images=_whole("calibration_images", raw["calibration_images"]),
            validation_images=_whole("validation_images", raw["validation_images"]),
            agreement=float(raw["agreement"]),
            min_agreement=float(raw["min_agreement"]),
            val={str(name): dict(metrics) for name, metrics in raw["val"].items()},
        )


def _whole(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ArtifactError(f"{name} must be a whole number >= 0, not {reprlib.repr(value)}")
    return value


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: :meth:`to_json` writes it, :meth:`from_json` reads it.

    ``temperatures`` are by test-time view set (``models.inference.VIEW_SETS``), always with
    the single view's (``none``), which the file also holds as ``temperature``;
    ``serving_tta`` is the view set the service averages over; ``files`` the sha256 of each
    of :attr:`file_names`, filled in by :func:`write_manifest`; ``explain`` the explaining
    graph's outputs beside the logits (None: an artifact exported before it had them);
    ``quantization`` how ONNX_FILE was quantized (None: float32); ``tracking`` the
    experiment tracker's record of the training run (``TRACKING_FILE``;
    None: not tracked).
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
    explain: ExplainOutputs | None = None
    quantization: Quantization | None = None
    tracking: Mapping[str, str] | None = None

    @property
    def temperature(self) -> float:
        """The single view's temperature."""
        return self.temperatures["none"]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def file_names(self) -> tuple[str, ...]:
        """The artifact's files beside the manifest."""
        graph = () if self.explain is None else (self.explain.graph,)
        return tuple(dict.fromkeys((*ARTIFACT_FILES, *graph)))

    def to_json(self) -> dict[str, Any]:
        explain = {} if self.explain is None else {"explain": self.explain.to_json()}
        quantization = (
            {} if self.quantization is None else {"quantization": self.quantization.to_json()}
        )
        tracking = {} if self.tracking is None else {"tracking": dict(self.tracking)}
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
            **explain,
            **quantization,
            **tracking,
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
            preprocessing = Preprocessing.from_dict(raw["preprocessing"])
        except ValueError as error:  # Preprocessing names the field and the value
            raise ArtifactError(f"preprocessing: {error}") from error
        except (AttributeError, KeyError, TypeError) as error:
            raise ArtifactError(f"incomplete or malformed: {error!r}") from error
        try:
            temperature = float(raw["temperature"])
            temperatures = {"none": temperature, **raw.get("temperatures", {})}
            manifest = cls(
                architecture=_checked_text("architecture", raw["architecture"]),
                classes=_checked_classes(raw["classes"]),
                head=dict(raw["head"]),
                preprocessing=preprocessing,
                temperatures={str(views): float(t) for views, t in temperatures.items()},
                serving_tta=_checked_text("serving.tta", raw.get("serving", {}).get("tta", "none")),
                val_metrics=dict(raw["metrics"]["val"]),
                training_config=dict(raw["training_config"]),
                versions=dict(raw["versions"]),
                created=str(raw["created"]),
                files={str(name): str(digest) for name, digest in raw["files"].items()},
                explain=None if "explain" not in raw else ExplainOutputs.from_json(raw["explain"]),
                quantization=(
                    None
                    if "quantization" not in raw
                    else Quantization.from_json(raw["quantization"])
                ),
                tracking=None if "tracking" not in raw else _checked_record(raw["tracking"]),
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
        _check_temperatures(manifest.temperatures, stated=temperature)
        return manifest


def _checked_text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ArtifactError(f"{name} must be a non-empty string, not {reprlib.repr(value)}")
    return value


def _checked_record(raw: Any) -> dict[str, str]:
    if not isinstance(raw, Mapping) or not all(isinstance(v, str) for v in raw.values()):
        raise ArtifactError(f"tracking must map names to strings, not {reprlib.repr(raw)}")
    return {str(name): value for name, value in raw.items()}


def write_tracked_run(run_dir: Path, record: Mapping[str, str]) -> Path:
    """``TRACKING_FILE``: which tracker run holds this run's params, metrics and report."""
    path = run_dir / TRACKING_FILE
    path.write_text(json.dumps(dict(record), indent=2) + "\n")
    return path


def read_tracked_run(run_dir: Path) -> dict[str, str] | None:
    """``run_dir``'s ``TRACKING_FILE``, None where the run was not tracked."""
    path = run_dir / TRACKING_FILE
    if not path.is_file():
        return None
    try:
        return _checked_record(json.loads(path.read_text()))
    except (json.JSONDecodeError, ArtifactError) as error:
        raise ArtifactError(f"{path}: {error}") from error


def _checked_classes(names: Any) -> tuple[str, ...]:
    """The manifest's class names, refused unless a non-empty list of distinct, non-empty
    strings: every answer of the service is keyed by them."""
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(name, str) and name for name in names)
    ):
        raise ArtifactError(
            f"classes must be a non-empty list of non-empty names, not {reprlib.repr(names)}"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ArtifactError(f"classes must be distinct; {reprlib.repr(repeated)} repeat")
    return tuple(names)


def _check_temperatures(temperatures: Mapping[str, float], *, stated: float) -> None:
    """Probabilities are ``softmax(logits / T)``: a T of 0 or NaN makes every answer NaN,
    and a negative one reverses the ranking."""
    named = [(f"temperatures[{views!r}]", value) for views, value in temperatures.items()]
    for name, value in [("temperature", stated), *named]:
        if not (math.isfinite(value) and value > 0):
            raise ArtifactError(f"{name} must be a finite number > 0, not {value!r}")
    if temperatures["none"] != stated:
        raise ArtifactError(
            f"temperature {stated!r} and temperatures['none'] {temperatures['none']!r} "
            "must be the same (the single view's)"
        )


def installed_version(distribution: str) -> str | None:
    """The installed version of a pip distribution (None if it is not installed), as the
    manifest's ``versions`` record it."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` with the sha256 of every artifact file filled in."""
    files = {name: sha256_file(directory / name) for name in manifest.file_names}
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
    _check_nothing_unverified(directory, manifest.file_names)
    for name in manifest.file_names:
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


def _check_nothing_unverified(directory: Path, file_names: tuple[str, ...]) -> None:
    """Refuse files beside the artifact's that no hash covers: onnxruntime reads external
    tensor data only from the graph's own directory, so with nothing unhashed there, every
    byte the graph can load is verified."""
    known = {MANIFEST_FILE, *file_names, STORE_RECORD}
    unknown = sorted(entry.name for entry in directory.iterdir() if entry.name not in known)
    if unknown:
        raise ArtifactError(
            f"artifact {directory} holds {reprlib.repr(unknown)}, which its manifest does not "
            f"cover (this artifact is {MANIFEST_FILE} and {', '.join(file_names)}): remove them"
        )


def stored_model(reference: str) -> bentoml.Model:
    """Model ``reference`` (``NAME[:VERSION]``) of the local BentoML store, its manifest
    matching the digest recorded in the store at export (where there is one: models
    exported before it have none).

    Never looked for elsewhere: BentoML would pull a model it does not find from BentoCloud.
    """
    import bentoml
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml.exceptions import BentoMLException

    store = BentoMLContainer.model_store.get()
    try:
        model = bentoml.models.get(reference, _model_store=store)
    except (BentoMLException, ValueError) as error:  # NotFound is a BentoMLException
        raise NotInStore(
            f"no model {reference!r} in the BentoML store {store._path} ({error}); see "
            "`bentoml models list`, or set BENTOML_HOME to the store that holds it"
        ) from error
    recorded = model.info.metadata.get(MANIFEST_DIGEST)
    manifest = Path(model.path) / MANIFEST_FILE
    if recorded is not None and (not manifest.is_file() or sha256_file(manifest) != recorded):
        raise ArtifactError(
            f"{manifest} does not match the sha256 the store recorded at export ({STORE_RECORD} "
            f"{MANIFEST_DIGEST}): the artifact is damaged or its manifest was modified"
        )
    return model


def locate_artifact(reference: str) -> Path:
    """``reference`` is an artifact directory or a ``NAME[:VERSION]`` in the BentoML store."""
    path = Path(reference)
    if (path / MANIFEST_FILE).is_file():
        return path
    if path.exists():
        raise ArtifactError(f"{path} is not a convtune artifact (no {MANIFEST_FILE})")
    if len(path.parts) > 1:  # a tag has no slash: this was meant as a directory
        raise ArtifactError(
            f"{path} does not exist; a run's artifact is written by `convtune export RUN_DIR "
            f"--name NAME` (to RUN_DIR/{ARTIFACT_DIR})"
        )
    try:
        return Path(stored_model(reference).path)
    except NotInStore as error:
        raise NotInStore(
            f"{reference!r} is neither an artifact directory nor a model in the store: {error}"
        ) from error
