"""Run an artifact's ONNX graph with onnxruntime: pixels in, class probabilities out.

Used by the service and by ``convtune predict``/``evaluate``, so the CLI and the HTTP
endpoint give the same numbers. Must not import torch.

Test-time augmentation (TTA) runs the model on several views of each image, the flips and
quarter turns of the preprocessed tensor (``VIEW_SETS``), and averages the calibrated
probabilities of the views (``view_probabilities``). Each view set has its own temperature,
fitted on the validation split for the average (``training.calibration``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convtune.data.images import DEFAULT_MAX_PIXELS, decode_rgb
from convtune.data.preprocessing import Placement, build_eval_transform, eval_decode_size
from convtune.models.artifact import (
    INPUT_NAME,
    MANIFEST_FILE,
    ONNX_FILE,
    OUTPUT_NAME,
    ArtifactError,
    ExplainOutputs,
    Manifest,
    read_manifest,
)

log = logging.getLogger("convtune")

# (quarter turns counterclockwise, mirrored left-right first) per view, the identity first.
VIEW_SETS: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "flip": ((0, False), (0, True)),
    "d4": tuple((turns, mirrored) for mirrored in (False, True) for turns in range(4)),
}


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``softmax(logits / temperature)``, shifted by the max so exp cannot overflow."""
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def check_view_set(views: str, *, input_size: tuple[int, int]) -> None:
    """Refuse an unknown view set, or quarter turns of a non-square input (they would change
    its shape)."""
    if views not in VIEW_SETS:
        raise ValueError(f"unknown view set {views!r}; one of {sorted(VIEW_SETS)}")
    height, width = input_size
    if views == "d4" and height != width:
        raise ValueError(
            f"d4 views rotate the input by 90 degrees, which needs a square input; "
            f"the input is {height}x{width} (use flip)"
        )


def image_views(pixels: np.ndarray, views: str) -> list[np.ndarray]:
    """The ``views`` copies of an ``(N, 3, H, W)`` batch, in ``VIEW_SETS`` order (the batch
    itself first); numpy views, not copies, so they may not be contiguous."""
    check_view_set(views, input_size=pixels.shape[-2:])
    return [
        np.rot90(pixels[..., ::-1] if mirrored else pixels, turns, axes=(-2, -1))
        for turns, mirrored in VIEW_SETS[views]
    ]


def view_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``(V, N, C)`` logits of V views of N images → the ``(N, C)`` mean over the views of
    ``softmax(logits_v / temperature)``. ``(N, C)`` logits are one view."""
    by_view = logits.reshape(-1, *logits.shape[-2:])
    return np.mean([softmax(view, temperature) for view in by_view], axis=0)


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


def _view_logits(session: Any, pixels: np.ndarray, views: str) -> np.ndarray:
    """``(V, N, C)`` logits of every view, all in one call of V×N images."""
    copies = image_views(pixels, views)
    batch = pixels if len(copies) == 1 else np.concatenate(copies)  # no copy of one view
    return _logits(session, batch).reshape(len(copies), len(pixels), -1)


@dataclass(frozen=True)
class Explanation:
    """What the network saw in a batch of N images.

    ``probabilities``: ``(N, C)``, calibrated and averaged over the views exactly as
    :meth:`OnnxClassifier.probabilities` gives them. ``class_maps``: ``(N, C, h, w)``, the
    head applied at each position of the last feature volume (CAM), None where the head is
    not linear (manifest ``explain.class_maps``). ``stages``: each stage's ``(N, Ck, hk,
    wk)`` feature maps by output name, in stage order. Maps and stages are of the
    unaltered view (the first of ``VIEW_SETS``).
    """

    probabilities: np.ndarray
    class_maps: np.ndarray | None
    stages: dict[str, np.ndarray]


def check_manifest_views(manifest: Manifest, path: Path) -> None:
    """Refuse a manifest (at ``path``) naming a view set this convtune does not know."""
    named = [(f"temperatures[{views!r}]", views) for views in manifest.temperatures]
    for name, views in [("serving.tta", manifest.serving_tta), *named]:
        if views not in VIEW_SETS:
            raise ArtifactError(
                f"{path}: {name} names view set {views!r}; one of {sorted(VIEW_SETS)}"
            )


def check_graph_interface(
    session: Any, manifest: Manifest, path: Path, *, explaining: bool = False
) -> None:
    """Refuse a graph (at ``path``, loaded in ``session``) that does not take the manifest's
    input or does not give one logit per class of it (and, ``explaining``, the outputs of
    manifest ``explain``): every request would fail, or its probabilities would carry the
    wrong names. Dimensions the graph leaves open pass."""
    height, width = manifest.preprocessing.input_size
    stated = {INPUT_NAME: (None, 3, height, width), OUTPUT_NAME: (None, manifest.num_classes)}
    if explaining and manifest.explain is not None:
        stated |= _explain_shapes(manifest.explain, manifest.num_classes)
    graph = {arg.name: tuple(arg.shape) for arg in (*session.get_inputs(), *session.get_outputs())}
    for name, shape in stated.items():
        found = graph.get(name)
        if found is None or not _shape_fits(found, shape):
            raise ArtifactError(
                f"{path}: the graph's {name!r} has shape {found}, its manifest's classes and "
                f"preprocessing give {['N', *shape[1:]]}"
            )


def _explain_shapes(explain: ExplainOutputs, num_classes: int) -> dict[str, tuple]:
    """The shapes of the explaining graph's outputs beside the logits, as the manifest
    states them."""
    last = explain.features
    maps = {} if explain.class_maps is None else {explain.class_maps: (num_classes,)}
    return {
        **{name: (None, *size, last.height, last.width) for name, size in maps.items()},
        **{
            stage.output: (None, stage.channels, stage.height, stage.width)
            for stage in explain.stages
        },
    }


def _shape_fits(found: tuple, stated: tuple) -> bool:
    """A graph's shape (a name where it leaves a size open) against a stated one (None
    where any size will do)."""
    return len(found) == len(stated) and all(
        want is None or not isinstance(size, int) or size == want
        for size, want in zip(found, stated, strict=True)
    )


class OnnxClassifier:
    """A verified artifact loaded into an onnxruntime session.

    ``tta`` is the view set of ``probabilities`` (``VIEW_SETS``; None: the one the artifact
    is served with, manifest ``serving.tta``), and ``temperature`` the one fitted for it,
    or the single-view temperature (with a warning) where the run fitted none for it.
    ``spin_waits`` False makes onnxruntime's threads sleep whenever they wait rather than
    spin (the service's default: ``service.batching.spin_waits``).
    """

    def __init__(
        self,
        artifact_dir: str | Path,
        *,
        threads: int = 0,
        tta: str | None = "none",
        spin_waits: bool = True,
    ) -> None:
        self.directory = Path(artifact_dir)
        self.manifest = read_manifest(self.directory)
        check_manifest_views(self.manifest, self.directory / MANIFEST_FILE)
        self.classes = self.manifest.classes
        self.tta = self.manifest.serving_tta if tta is None else tta
        check_view_set(self.tta, input_size=self.manifest.preprocessing.input_size)
        self.temperature = self._temperature()
        self.transform = build_eval_transform(self.manifest.preprocessing)
        self.decode_size = eval_decode_size(self.manifest.preprocessing)
        self.threads = threads
        self.spin_waits = spin_waits
        self.session = self._session(ONNX_FILE, threads)
        check_graph_interface(self.session, self.manifest, self.directory / ONNX_FILE)
        self._explaining_session: Any = None  # made by the first explain()

    def _temperature(self) -> float:
        fitted = self.manifest.temperatures.get(self.tta)
        if fitted is not None:
            return fitted
        log.warning(
            "%s has no temperature fitted for %s views (fit with --tta %s); using the "
            "single-view one, %.3f",
            self.directory, self.tta, self.tta, self.manifest.temperature,
        )  # fmt: skip
        return self.manifest.temperature

    def _session(self, graph: str, threads: int) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads  # 0: onnxruntime picks (one per core)
        if not self.spin_waits:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(
            str(self.directory / graph), options, providers=["CPUExecutionProvider"]
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

    def view_logits(self, pixels: np.ndarray) -> np.ndarray:
        """``(V, N, C)`` logits of the ``tta`` views of a ``(N, 3, h, w)`` batch."""
        return _view_logits(self.session, pixels, self.tta)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities for a ``(N, 3, h, w)`` batch, averaged over the
        ``tta`` views."""
        return view_probabilities(self.view_logits(pixels), self.temperature)

    def probabilities_on_new_session(self, *, threads: int) -> Callable[[np.ndarray], np.ndarray]:
        """``probabilities`` on an onnxruntime session of its own with ``threads`` threads,
        which runs side by side with this one and with others (the service's inference
        lanes, ``service.batching``)."""
        session = self._session(ONNX_FILE, threads)
        return lambda pixels: view_probabilities(
            _view_logits(session, pixels, self.tta), self.temperature
        )

    def classify(self, images: list[np.ndarray]) -> np.ndarray:
        """Probabilities for decoded RGB images, shape ``(len(images), num_classes)``."""
        return self.probabilities(np.stack([self.preprocess(image) for image in images]))

    def placement(self, image: np.ndarray) -> Placement:
        """Where the eval view takes ``image``'s pixels from and puts them in the input: the
        ``geometry`` that maps a class map back onto ``image`` (``models.cam``)."""
        return self.transform.geometry.placement(*image.shape[:2])

    def explain_outputs(self) -> ExplainOutputs:
        """The manifest's ``explain``; :class:`ArtifactError` for an artifact without it."""
        if self.manifest.explain is None:
            raise ArtifactError(
                f"{self.directory} was exported without feature maps (by an earlier convtune, "
                "or from an encoder that does not give its stages): re-export the run with "
                "this version (`convtune export RUN_DIR --name NAME`)"
            )
        return self.manifest.explain

    def explaining_session(self) -> Any:
        """The onnxruntime session of the explaining graph (manifest ``explain.graph``),
        made on first use: a service that never explains never loads it."""
        if self._explaining_session is None:
            graph = self.explain_outputs().graph
            session = self.session if graph == ONNX_FILE else self._session(graph, self.threads)
            check_graph_interface(session, self.manifest, self.directory / graph, explaining=True)
            self._explaining_session = session
        return self._explaining_session

    def explain(self, pixels: np.ndarray) -> Explanation:
        """The probabilities, class maps and stage volumes of a ``(N, 3, h, w)`` batch,
        from the explaining graph. Raises :class:`ArtifactError` for an artifact exported
        without one.
        """
        explain = self.explain_outputs()
        names = explain.output_names
        logits, *outputs = self.explaining_session().run(
            [OUTPUT_NAME, *names], {INPUT_NAME: pixels}
        )
        views = image_views(pixels, self.tta)[1:]  # the unaltered view's logits are here
        if views:
            logits = np.concatenate([logits, self.logits(np.concatenate(views))])
        by_name = dict(zip(names, outputs, strict=True))
        return Explanation(
            probabilities=view_probabilities(
                logits.reshape(1 + len(views), len(pixels), -1), self.temperature
            ),
            class_maps=by_name.pop(explain.class_maps, None),
            stages=by_name,
        )
