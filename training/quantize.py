"""An INT8 artifact: onnxruntime static quantization of the logits' graph, calibrated on the
run's own training images and accepted only where it agrees with the float graph on the
run's validation split.

QDQ format (a quantize/dequantize pair around each quantized op, which onnxruntime fuses
into integer kernels) with per-output-channel weight scales: a depthwise convolution's
channels differ by orders of magnitude, and one scale for all of them would round most
channels to a few levels. Activation ranges come from the calibration images; ``minmax``
takes each tensor's extremes, which a handful of outlier activations stretch so far that
the common values lose most of their levels, ``percentile`` and ``entropy`` clip them.
Weights use 7 bits (onnxruntime's ``reduce_range``): CPUs without VNNI multiply u8 × s8
pairs into an int16 sum that saturates with full-range weights, and an artifact may be
served on either kind.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from convtune.data.splits import saved_part
from convtune.models.artifact import INPUT_NAME, ONNX_FILE, OUTPUT_NAME, SPLIT_FILE, Quantization
from convtune.training.metrics import classification_metrics

if TYPE_CHECKING:  # the CLI reads this module's choices; onnxruntime loads on use
    from convtune.models.inference import OnnxClassifier

log = logging.getLogger("convtune")

PRECISIONS = ("int8",)
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
DEFAULT_CALIBRATION_METHOD = "entropy"
DEFAULT_CALIBRATION_IMAGES = 512
# The acceptance rule: top-1 agreement with the float graph (the default; the user may
# accept less), and accuracy lost, on val.
MIN_AGREEMENT = 0.99
MAX_ACCURACY_DROP = 0.005
_BATCH = 16


class QuantizationRefused(ValueError):
    """The quantized graph does not agree with the float one well enough to replace it."""


def check_quantization_options(
    *, precision: str, method: str, min_agreement: float, max_accuracy_drop: float
) -> None:
    """A ValueError naming the first option :func:`quantize_artifact` cannot take."""
    if precision not in PRECISIONS:
        raise ValueError(f"--quantize {precision!r}: one of {list(PRECISIONS)}")
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"the agreement to require is a share in [0, 1], not {min_agreement}")
    if not 0.0 <= max_accuracy_drop <= 1.0:
        raise ValueError(
            f"the accuracy the graph may lose is 0 to 100 points, not {max_accuracy_drop * 100:g}"
        )
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r}: one of {list(CALIBRATION_METHODS)}")


def quantize_artifact(
    artifact_dir: Path,
    run_dir: Path,
    *,
    precision: str = "int8",
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    method: str = DEFAULT_CALIBRATION_METHOD,
    min_agreement: float = MIN_AGREEMENT,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
    seed: int = 0,
) -> Quantization:
    """Replace ``artifact_dir``'s float graph with its ``precision`` quantization, calibrated
    on up to ``calibration_images`` of ``run_dir``'s training images (drawn with ``seed``)
    by ``method``; the record for the manifest. Raises :class:`QuantizationRefused`, the
    artifact unchanged, where the quantized graph's top-1 agrees with the float graph's on
    less than ``min_agreement`` of the val images, or it loses more than
    ``max_accuracy_drop`` accuracy there."""
    check_quantization_options(
        precision=precision, method=method, min_agreement=min_agreement,
        max_accuracy_drop=max_accuracy_drop,
    )  # fmt: skip
    from convtune.models.inference import OnnxClassifier

    classifier = OnnxClassifier(artifact_dir)
    train = saved_part(run_dir / SPLIT_FILE, "train")
    val = saved_part(run_dir / SPLIT_FILE, "val")
    if not val:
        raise QuantizationRefused(f"{run_dir} has no validation images to check the graph on")
    drawn = np.random.default_rng(seed).permutation(len(train))[:calibration_images]
    log.info("quantizing: calibrating on %d training images (%s)", len(drawn), method)
    calibration = _pixels(classifier, [train[i][0] for i in drawn])
    with tempfile.TemporaryDirectory(prefix="convtune-quantize-") as folder:
        quantized = Path(folder) / ONNX_FILE
        _quantize_graph(artifact_dir / ONNX_FILE, quantized, calibration, method=method)
        del calibration
        log.info("quantizing: checking against the float graph on %d val images", len(val))
        record = _judge(
            classifier, _session(quantized), val, precision=precision,
            min_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop,
        )  # fmt: skip
        shutil.copyfile(quantized, artifact_dir / ONNX_FILE)
    return Quantization(method=method, calibration_images=len(drawn), **record)


def _quantize_graph(source: Path, target: Path, calibration: np.ndarray, *, method: str) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name("prepared.onnx")
    quant_pre_process(str(source), str(prepared))  # folds and fuses before the ranges are taken
    # The calibrators print their progress; stdout is the command's answer.
    with contextlib.redirect_stdout(io.StringIO()):
        _quantize_static(prepared, target, calibration, method=method)


def _quantize_static(prepared: Path, target: Path, calibration: np.ndarray, *, method: str) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    quantize_static(
        str(prepared),
        str(target),
        _CalibrationBatches(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method={
            "minmax": CalibrationMethod.MinMax,
            "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy,
        }[method],
        # One batch's activations at a time: the calibrators keep every batch's otherwise.
        extra_options={"CalibStridedMinMax": 1},
    )


class _CalibrationBatches:
    """onnxruntime's calibration data reader over batches of preprocessed images, in the
    ranges its strided calibration asks for."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.batches = [pixels[start : start + _BATCH] for start in range(0, len(pixels), _BATCH)]
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pending = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._pending, None)
        return None if batch is None else {INPUT_NAME: batch}


def _judge(
    classifier: OnnxClassifier,
    quantized: Any,
    val: Sequence[tuple[str, str]],
    *,
    precision: str,
    min_agreement: float,
    max_accuracy_drop: float,
) -> dict[str, Any]:
    """The quantized graph's agreement and metrics against the float one on ``val``; refuse
    it where they miss ``min_agreement`` or ``max_accuracy_drop``."""
    labels = np.array([classifier.classes.index(name) for _, name in val])
    predicted: dict[str, list[np.ndarray]] = {"float32": [], precision: []}
    for start in range(0, len(val), _BATCH):
        pixels = _pixels(classifier, [path for path, _ in val[start : start + _BATCH]])
        for name, session in (("float32", classifier.session), (precision, quantized)):
            logits = session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
            predicted[name].append(logits.argmax(axis=1))
    by_graph = {name: np.concatenate(found) for name, found in predicted.items()}
    metrics = {}
    for name, found in by_graph.items():
        scores = classification_metrics(labels, found, classifier.classes)
        metrics[name] = {key: scores[key] for key in ("accuracy", "macro_f1")}
    agreement = float(np.mean(by_graph["float32"] == by_graph[precision]))
    drop = metrics["float32"]["accuracy"] - metrics[precision]["accuracy"]
    log.info("quantizing: top-1 agreement %.4f, accuracy %.4f → %.4f", agreement,
             metrics["float32"]["accuracy"], metrics[precision]["accuracy"])  # fmt: skip
    if agreement < min_agreement or drop > max_accuracy_drop:
        raise QuantizationRefused(
            f"the {precision} graph agrees with the float one on {agreement:.2%} of "
            f"{len(val)} val images (needs {min_agreement:.1%}) and its accuracy is "
            f"{metrics[precision]['accuracy']:.2%} against {metrics['float32']['accuracy']:.2%} "
            f"(may lose {max_accuracy_drop * 100:.1f} points at most): not written; try more "
            "calibration images or another calibration method"
        )
    return {
        "precision": precision,
        "validation_images": len(val),
        "agreement": agreement,
        "min_agreement": min_agreement,
        "val": metrics,
    }


def _pixels(classifier: OnnxClassifier, paths: Sequence[str]) -> np.ndarray:
    return np.stack([classifier.preprocess(classifier.decode(path)) for path in paths])


def _session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
