"""The peer a BentoML user writes from BentoML's docs and examples, serving the same ONNX
graph as a convtune artifact.

One ``@bentoml.service`` class holds an onnxruntime session with default options; one
``@bentoml.api(batchable=True)`` method takes a list of ``PIL.Image.Image`` (BentoML's
image input: multipart files in the field ``images``), which BentoML's adaptive batching
fills from concurrent requests. Each image is resized (shorter side to ``size / crop_pct``,
PIL's default bicubic), centre-cropped and normalised with numpy; the answer per image is
the softmax of its logits by class name, without the artifact's calibration temperature.
Service and batching settings are BentoML's defaults: this is the untuned baseline that
``convtune bench serve`` measures convtune's service against. The artifact directory
comes from ``$CONVTUNE_PEER_ARTIFACT``::

    CONVTUNE_PEER_ARTIFACT=runs/x/artifact \\
        bentoml serve convtune.benchmarks.bentoml_peer:ImageClassifier
"""

import os

import bentoml
import numpy as np
import onnxruntime as ort
from PIL import Image

from convtune.models.artifact import INPUT_NAME, ONNX_FILE, OUTPUT_NAME, read_manifest


@bentoml.service
class ImageClassifier:
    def __init__(self) -> None:
        artifact = os.environ["CONVTUNE_PEER_ARTIFACT"]
        manifest = read_manifest(artifact)
        self.classes = manifest.classes
        self.size = manifest.preprocessing.input_size[0]
        self.resize_to = int(self.size / manifest.preprocessing.crop_pct)
        self.mean = np.array(manifest.preprocessing.mean, dtype=np.float32)
        self.std = np.array(manifest.preprocessing.std, dtype=np.float32)
        self.session = ort.InferenceSession(
            os.path.join(artifact, ONNX_FILE), providers=["CPUExecutionProvider"]
        )

    def preprocess(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        scale = self.resize_to / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)))
        left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        pixels = np.asarray(image, dtype=np.float32) / 255
        return ((pixels - self.mean) / self.std).transpose(2, 0, 1)

    @bentoml.api(batchable=True)
    def classify(self, images: list[Image.Image]) -> list[dict[str, float]]:
        batch = np.stack([self.preprocess(image) for image in images])
        logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = exp / exp.sum(axis=1, keepdims=True)
        return [dict(zip(self.classes, row.tolist(), strict=True)) for row in probabilities]
