"""Export a finished run as an artifact and register it in the BentoML model store.

The ONNX graphs are only accepted if onnxruntime reproduces PyTorch's logits on a probe
batch (max abs difference ≤ ``TOLERANCE``), and the explaining graph's class maps and stage
volumes too (within ``TOLERANCE`` of their scale): an export that silently changes the
model is worse than no export.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import torch
from safetensors.torch import load_file

from convtune.data.splits import saved_classes
from convtune.models.artifact import (
    INPUT_NAME,
    MANIFEST_DIGEST,
    MANIFEST_FILE,
    MODEL_DESCRIPTION,
    MODEL_WEIGHTS,
    ONNX_FILE,
    OUTPUT_NAME,
    SPLIT_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    ExplainOutputs,
    Manifest,
    ModelDescription,
    installed_version,
    read_manifest,
    read_model_description,
    read_tracked_run,
    sha256_file,
    write_manifest,
)
from convtune.models.factory import ImageClassifier, rebuild_model
from convtune.models.inference import OnnxClassifier, check_view_set
from convtune.training.config import load_saved_config
from convtune.training.explained_graph import (
    ExplainedClassifier,
    describe_volumes,
    has_exact_class_maps,
)
from convtune.training.quantize import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_CALIBRATION_METHOD,
    MAX_ACCURACY_DROP,
    MIN_AGREEMENT,
    check_quantization_options,
    quantize_artifact,
)

log = logging.getLogger("convtune")
TOLERANCE = 1e-4
_VERSIONED_PACKAGES = (
    "convtune",
    "torch",
    "timm",
    "lightning",
    "albumentations",
    "onnx",
    "onnxruntime",
)


class ExportError(RuntimeError):
    """The run cannot be exported, or the exported graph does not match the model."""


def load_trained_model(run_dir: Path) -> tuple[ImageClassifier, ModelDescription]:
    """Rebuild a run's best model from its ``MODEL_DESCRIPTION`` and ``MODEL_WEIGHTS``."""
    if not (run_dir / MODEL_DESCRIPTION).is_file():
        raise ExportError(f"{run_dir} has no {MODEL_DESCRIPTION}: has `convtune fit` finished?")
    description = read_model_description(run_dir)
    model = rebuild_model(description.structure)
    model.load_state_dict(load_file(run_dir / MODEL_WEIGHTS))
    return model.eval(), description


def export_onnx(model: ImageClassifier, directory: Path) -> ExplainOutputs | None:
    """Write ``model``'s graphs into ``directory``: the explaining one (logits, then the
    class maps where they are exact and each stage's volume: what the returned manifest
    ``explain`` describes), and the logits' part of it alone. An encoder that cannot give
    its stages gets the logits' graph only, and None."""
    height, width = model.preprocessing.input_size
    example = torch.randn(2, 3, height, width)
    if not hasattr(model.encoder, "forward_intermediates"):
        log.warning("%s does not give its stages' feature maps: logits only", model.architecture)
        write_graph(model, example, directory / ONNX_FILE, output_names=[OUTPUT_NAME])
        return None
    with_class_maps = has_exact_class_maps(model, example)
    explain = describe_volumes(model, with_class_maps=with_class_maps)
    write_graph(
        ExplainedClassifier(model, with_class_maps=with_class_maps).eval(),
        example,
        directory / explain.graph,
        output_names=[OUTPUT_NAME, *explain.output_names],
    )
    explaining = onnx.load(directory / explain.graph)
    logits_only = onnx.utils.Extractor(explaining).extract_model([INPUT_NAME], [OUTPUT_NAME])
    onnx.save(logits_only, directory / ONNX_FILE)
    return explain


def write_graph(
    graph: torch.nn.Module, example: torch.Tensor, path: Path, *, output_names: list[str]
) -> None:
    """Export ``graph`` run on ``example`` to ONNX at ``path``, with a dynamic batch axis."""
    torch.onnx.export(
        graph,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=output_names,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def build_artifact(
    run_dir: Path,
    destination: Path,
    *,
    serve_tta: str = "none",
    quantize: str | None = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    calibration_method: str = DEFAULT_CALIBRATION_METHOD,
    min_agreement: float = MIN_AGREEMENT,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
) -> Path:
    """Write a verified artifact for ``run_dir`` into ``destination`` (replaced if present),
    to be served averaging over the ``serve_tta`` views; with ``quantize`` (a precision),
    its logits' graph quantized (``training.quantize``), accepted at ``min_agreement``
    top-1 agreement with the float graph on val and at most ``max_accuracy_drop`` (a
    share) of accuracy lost there."""
    if quantize is not None:  # before the export's seconds of work
        check_quantization_options(
            precision=quantize, method=calibration_method, min_agreement=min_agreement,
            max_accuracy_drop=max_accuracy_drop,
        )  # fmt: skip
    model, description = load_trained_model(run_dir)
    manifest = build_manifest(run_dir, description, serve_tta=serve_tta)
    with tempfile.TemporaryDirectory(prefix="convtune-export-") as staging_name:
        staging = Path(staging_name)
        explain = export_onnx(model, staging)
        shutil.copyfile(run_dir / MODEL_WEIGHTS, staging / WEIGHTS_FILE)
        manifest = replace(manifest, explain=explain)
        write_manifest(staging, manifest)
        check_onnx_matches(model, staging)
        if quantize is not None:
            quantization = quantize_artifact(
                staging, run_dir, precision=quantize, calibration_images=calibration_images,
                method=calibration_method, min_agreement=min_agreement,
                max_accuracy_drop=max_accuracy_drop,
            )  # fmt: skip
            write_manifest(staging, replace(manifest, quantization=quantization))
        if destination.exists():
            shutil.rmtree(destination)
        shutil.copytree(staging, destination)
    return destination


def build_manifest(
    run_dir: Path, description: ModelDescription, *, serve_tta: str = "none"
) -> Manifest:
    """The manifest of ``run_dir``'s model (``description``: its ``MODEL_DESCRIPTION``), to
    be served averaging over the ``serve_tta`` views."""
    structure = description.structure
    check_serving_views(
        serve_tta,
        temperatures=description.temperatures,
        input_size=structure.preprocessing.input_size,
    )
    return Manifest(
        architecture=structure.architecture,
        classes=saved_classes(run_dir / SPLIT_FILE),
        head=structure.head,
        preprocessing=structure.preprocessing,
        temperatures=description.temperatures,
        serving_tta=serve_tta,
        val_metrics=description.val_metrics,
        training_config=load_saved_config(run_dir).to_dict(),
        versions={name: installed_version(name) for name in _VERSIONED_PACKAGES},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        tracking=read_tracked_run(run_dir),
    )


def check_serving_views(
    views: str, *, temperatures: Mapping[str, float], input_size: tuple[int, int]
) -> None:
    """Refuse a view set the service cannot average over; warn if the run fitted no
    temperature for it."""
    check_view_set(views, input_size=input_size)
    if views not in temperatures:
        log.warning(
            "the run has no temperature fitted for %s views (fit with --tta %s): the service "
            "will use the single-view one", views, views,
        )  # fmt: skip


def with_serving_tta(artifact_dir: Path, destination: Path, *, tta: str) -> Path:
    """A copy of an artifact in ``destination`` whose service averages over the ``tta``
    views: a new manifest, the same files."""
    manifest = read_manifest(artifact_dir)
    check_serving_views(
        tta, temperatures=manifest.temperatures, input_size=manifest.preprocessing.input_size
    )
    shutil.copytree(artifact_dir, destination)
    write_manifest(destination, replace(manifest, serving_tta=tta))
    return destination


def check_onnx_matches(model: ImageClassifier, artifact_dir: Path) -> float:
    """Max |logit difference| between PyTorch and onnxruntime on a fixed probe batch; the
    explaining graph's outputs (manifest ``explain``) are checked as well."""
    height, width = model.preprocessing.input_size
    probe = torch.randn(3, 3, height, width, generator=torch.Generator().manual_seed(0))
    try:
        classifier = OnnxClassifier(artifact_dir)
    except ArtifactError as error:
        raise ExportError(f"the freshly written artifact does not verify: {error}") from error
    with torch.no_grad():
        expected = model(probe).numpy()
    difference = _check_output(OUTPUT_NAME, classifier.logits(probe.numpy()), expected, scale=1.0)
    explain = classifier.manifest.explain
    if explain is not None:
        names = [OUTPUT_NAME, *explain.output_names]
        with torch.no_grad():
            explained = ExplainedClassifier(model, with_class_maps=explain.class_maps is not None)
            wanted = [output.numpy() for output in explained(probe)]
        actual = classifier.explaining_session().run(names, {INPUT_NAME: probe.numpy()})
        for name, got, want in zip(names, actual, wanted, strict=True):
            _check_output(name, got, want, scale=max(1.0, float(np.abs(want).max())))
    return difference


def _check_output(name: str, actual: np.ndarray, expected: np.ndarray, *, scale: float) -> float:
    """Refuse the export if onnxruntime's ``name`` differs from PyTorch's by more than
    ``TOLERANCE`` times ``scale`` (1 for logits; the largest value for a feature volume,
    whose float rounding grows with its values)."""
    if actual.shape != expected.shape:
        raise ExportError(f"ONNX gives {name} of shape {actual.shape}, PyTorch {expected.shape}")
    difference = float(np.max(np.abs(actual - expected)))
    if difference > TOLERANCE * scale:
        what = "logits" if name == OUTPUT_NAME else f"{name} outputs"
        raise ExportError(
            f"ONNX and PyTorch {what} differ by {difference:.2e} (> {TOLERANCE * scale:.0e}); "
            "the export is not faithful, refusing to write it"
        )
    return difference


def register_in_store(artifact_dir: Path, name: str, *, bentoml_home: Path | None = None) -> str:
    """Copy an artifact into the BentoML model store; return its tag.

    The store is ``$BENTOML_HOME``'s, or the one under ``bentoml_home`` (benchmarks serve
    from a private store, leaving the user's alone).
    """
    import bentoml

    store = {}
    if bentoml_home is not None:
        # BentoML reads $BENTOML_HOME once; another store is only reachable this way.
        from bentoml._internal.models import ModelStore

        store["_model_store"] = ModelStore(bentoml_home / "models")
    manifest = read_manifest(artifact_dir)
    with bentoml.models.create(
        name,
        labels={"framework": "onnx", "architecture": manifest.architecture},
        metadata={
            "classes": list(manifest.classes),
            "val": dict(manifest.val_metrics),
            # Verified when the model is read from the store (models.artifact.stored_model).
            MANIFEST_DIGEST: sha256_file(artifact_dir / MANIFEST_FILE),
        },
        **store,
    ) as stored:
        for file in artifact_dir.iterdir():
            shutil.copyfile(file, Path(stored.path) / file.name)
    return str(stored.tag)
