"""Run an artifact's ONNX graph with onnxruntime: pixels in, class probabilities out.

Used by the service and by ``convtune predict``/``evaluate``, so the CLI and the HTTP
endpoint give the same numbers. Must not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from data.images import DEFAULT_MAX_PIXELS, decode_rgb
from data.transforms import build_eval_transform, eval_decode_size
from models.artifact import ONNX_FILE, read_manifest

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``softmax(logits / temperature)``, shifted by the max so exp cannot overflow."""
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def format_prediction(
    probabilities: np.ndarray, classes: tuple[str, ...], top_k: int
) -> dict[str, Any]:
    """One image's answer: top-1 label, every class's probability, and the top ``k``."""
    order = np.argsort(-probabilities, kind="stable")[: max(1, min(top_k, len(classes)))]
    return {
        "label": classes[int(order[0])],
        "probabilities": {name: float(p) for name, p in zip(classes, probabilities, strict=True)},
        "top_k": [
            {"label": classes[int(i)], "probability": float(probabilities[i])} for i in order
        ],
    }


def _logits(session: Any, pixels: np.ndarray) -> np.ndarray:
    return session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]


class OnnxClassifier:
    """A verified artifact loaded into an onnxruntime session."""

    def __init__(self, artifact_dir: str | Path, *, threads: int = 0) -> None:
        self.directory = Path(artifact_dir)
        self.manifest = read_manifest(self.directory)
        self.classes = self.manifest.classes
        self.transform = build_eval_transform(self.manifest.preprocessing)
        self.decode_size = eval_decode_size(self.manifest.preprocessing)
        self.session = self._session(threads)

    def _session(self, threads: int) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads  # 0: onnxruntime picks (one per core)
        return ort.InferenceSession(
            str(self.directory / ONNX_FILE), options, providers=["CPUExecutionProvider"]
        )

    def decode(
        self, source: bytes | str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> np.ndarray:
        """An image file or upload → ``(H, W, 3)`` RGB, JPEGs shrunk while decoding."""
        return decode_rgb(source, max_pixels=max_pixels, draft_size=self.decode_size)

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """An ``(H, W, 3)`` uint8 image → the ``(3, h, w)`` float32 input of the graph."""
        return self.transform(image=rgb)["image"]

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        return _logits(self.session, pixels)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities for a ``(N, 3, h, w)`` batch."""
        return softmax(self.logits(pixels), self.manifest.temperature)

    def lane(self, *, threads: int) -> Callable[[np.ndarray], np.ndarray]:
        """``probabilities`` on a session of its own with ``threads`` threads, to run
        beside this one and other lanes (``service.batching``)."""
        session = self._session(threads)
        return lambda pixels: softmax(_logits(session, pixels), self.manifest.temperature)

    def classify(self, images: list[np.ndarray]) -> np.ndarray:
        """Probabilities for decoded RGB images, shape ``(len(images), num_classes)``."""
        return self.probabilities(np.stack([self.preprocess(image) for image in images]))
