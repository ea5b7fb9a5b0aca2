"""``convtune explain`` and the report's activation maps: where in an image the evidence
for a class lies.

An artifact with class maps (a linear head, the default) is explained by onnxruntime
alone: CAM, the head applied at each position of the last feature volume
(``models.cam``). Any other head gets Grad-CAM (Selvaraju et al. 2017) in torch, on the
weights the artifact carries: each feature map weighted by the mean gradient of the class
logit over it. On a linear head the gradient is the head's weights over the positions'
count, so Grad-CAM is CAM less its bias, divided by that count: the same picture.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from convtune.data.images import decode_rgb
from convtune.models.artifact import ArtifactError
from convtune.models.cam import class_activation_map, overlay, png_bytes
from convtune.models.inference import OnnxClassifier, format_prediction

log = logging.getLogger("convtune")
# An image (H, W, 3) uint8 and a class index → the class's map on the image's pixels.
Explainer = Callable[[np.ndarray, int], np.ndarray]
DEFAULT_OPACITY = 0.5


def onnx_explainer(classifier: OnnxClassifier) -> Explainer:
    """CAM from the artifact's class maps (onnxruntime; no torch)."""

    def explain(rgb: np.ndarray, class_index: int) -> np.ndarray:
        maps = classifier.explain(classifier.preprocess(rgb)[np.newaxis]).class_maps
        assert maps is not None  # artifact_explainer chose this explainer for that reason
        return class_activation_map(maps[0, class_index], geometry=classifier.placement(rgb))

    return explain


def torch_explainer(model: Any) -> Explainer:
    """Grad-CAM on a torch ``ImageClassifier`` (``models.factory``), at its eval view."""
    import torch

    from convtune.data.preprocessing import build_eval_transform

    transform = build_eval_transform(model.preprocessing)
    geometry = transform.geometry
    device = next(model.parameters()).device

    def explain(rgb: np.ndarray, class_index: int) -> np.ndarray:
        pixels = torch.from_numpy(transform(image=rgb)["image"][np.newaxis]).to(device)
        cam = grad_cam(model, pixels, [class_index])[0]
        return class_activation_map(cam, geometry=geometry.placement(*rgb.shape[:2]))

    return explain


def grad_cam(model: Any, pixels: Any, class_indices: list[int]) -> np.ndarray:
    """``(N, h, w)`` Grad-CAM of ``pixels``' image n for class ``class_indices[n]``, on the
    last feature volume (the one the head pools).

    Without the paper's final ReLU: the maps are drawn scaled from their minimum
    (``models.cam.class_activation_map``) as CAM's are, so on a linear head the two draw
    the same picture.
    """
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            features = model.encoder.forward_features(pixels).detach().requires_grad_(True)
            logits = model.head(model.encoder.forward_head(features))
            chosen = logits[torch.arange(len(pixels)), torch.as_tensor(class_indices)]
            (gradients,) = torch.autograd.grad(chosen.sum(), features)
    finally:
        model.train(was_training)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    return (weights * features).sum(dim=1).detach().float().cpu().numpy()


def load_artifact_model(classifier: OnnxClassifier) -> Any:
    """The artifact's model in torch, from its own weights (for Grad-CAM)."""
    from safetensors.torch import load_file

    from convtune.models.artifact import WEIGHTS_FILE, ModelStructure
    from convtune.models.factory import rebuild_model

    manifest = classifier.manifest
    model = rebuild_model(
        ModelStructure(
            architecture=manifest.architecture,
            num_classes=manifest.num_classes,
            head=manifest.head,
            preprocessing=manifest.preprocessing,
        )
    )
    model.load_state_dict(load_file(classifier.directory / WEIGHTS_FILE))
    return model.eval()


def artifact_explainer(classifier: OnnxClassifier) -> tuple[Explainer, str]:
    """The explainer for an artifact and its method's name: CAM where the graph gives class
    maps, Grad-CAM in torch otherwise."""
    if classifier.explain_outputs().class_maps is not None:
        return onnx_explainer(classifier), "CAM"
    return torch_explainer(load_artifact_model(classifier)), "Grad-CAM"


def report_explainer(classifier: OnnxClassifier) -> Explainer | None:
    """The evaluation report's explainer for an artifact; None (a report without maps, and
    a warning) for one exported before artifacts had feature maps."""
    try:
        return artifact_explainer(classifier)[0]
    except ArtifactError as error:
        log.warning("the report shows no activation maps: %s", error)
        return None


def explain_image(
    classifier: OnnxClassifier,
    image: Path,
    out: Path,
    *,
    class_name: str | None = None,
    opacity: float = DEFAULT_OPACITY,
    top_k: int = 3,
) -> dict[str, Any]:
    """Write ``image`` with the activation map of ``class_name`` (None: the predicted class)
    over it to ``out`` (PNG, the image's full size); return the prediction and what was
    drawn. The prediction and the map are of the pixels ``predict`` sees."""
    if class_name is not None and class_name not in classifier.classes:
        raise ValueError(
            f"--class {class_name!r} is not one of the model's classes: "
            f"{', '.join(classifier.classes)}"
        )
    explainer, method = artifact_explainer(classifier)
    seen = classifier.decode(image)  # what predict sees: a large JPEG shrinks in decoding
    probabilities = classifier.classify([seen])[0]
    prediction = format_prediction(probabilities, classifier.classes, top_k)
    explained = class_name or prediction["label"]
    heat = explainer(seen, classifier.classes.index(explained))
    rgb = decode_rgb(image)
    if rgb.shape != seen.shape:
        heat = cv2.resize(heat, rgb.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png_bytes(overlay(rgb, heat, opacity)))
    return {
        "image": str(image), **prediction,
        "explained_class": explained, "method": method, "overlay": str(out),
    }  # fmt: skip
