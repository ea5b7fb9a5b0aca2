"""The frozen phase as a linear probe on cached features.

While the encoder is frozen and in eval mode, its output for an un-augmented image never
changes, so running it once per image is enough: encode the train split once, then train
the head for the frozen epochs on the stored feature vectors, which costs almost nothing
per epoch. The probe sees un-augmented images (the normal frozen epochs see augmented
ones); ``benchmarks/train.py`` compares the two.

The one pass runs through onnxruntime where enough images pay for exporting the encoder
first, through torch otherwise; both give the same features.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from convtune.data.datamodule import ImageDataModule
from convtune.models.artifact import INPUT_NAME
from convtune.models.factory import ImageClassifier
from convtune.training.export import TOLERANCE, write_graph
from convtune.training.metrics import accuracy
from convtune.training.module import Recipe, build_loss, build_optimizer, param_groups

log = logging.getLogger("convtune")
Encoder = Callable[[torch.Tensor], torch.Tensor]  # a pixel batch -> its feature vectors
# onnxruntime runs the encoder several times as fast as torch's eval mode on a CPU, but the
# export costs seconds first: with tf_efficientnet_lite0 it pays from a few hundred images
# on (docs/benchmarks.md, "Making that one pass cheaper": the figures and the break-even).
ONNX_MIN_IMAGES = 500


@torch.no_grad()
def encode(encoder: Encoder, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """``encoder``'s features and the labels for every image of ``loader``."""
    features, labels = [], []
    for pixels, target in loader:
        features.append(encoder(pixels))
        labels.append(torch.as_tensor(target))
    return torch.cat(features), torch.cat(labels)


def frozen_encoder(model: ImageClassifier, *, images: int) -> Encoder:
    """``model.encoder`` in eval mode, to encode ``images`` images: on onnxruntime where
    that many pay for the export (:data:`ONNX_MIN_IMAGES`) and it succeeds, else torch."""
    model.encoder.eval()
    if images >= ONNX_MIN_IMAGES and (exported := onnx_encoder(model)) is not None:
        return exported
    return model.encoder


@torch.no_grad()
def onnx_encoder(model: ImageClassifier) -> Encoder | None:
    """``model.encoder`` (in eval mode) exported to ONNX and run by onnxruntime, on as many
    threads as torch uses; None, with a warning, if the export fails or the graph's
    features differ from torch's (by more than ``TOLERANCE`` of their scale)."""
    import onnxruntime as ort

    height, width = model.preprocessing.input_size
    # Its own generator: the global one's draws are the training's, the same either way.
    example = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="convtune-probe-") as directory:
            graph = Path(directory) / "encoder.onnx"
            write_graph(model.encoder, example, graph, output_names=["features"])
            session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # the exporter's failures have no common type
        log.warning("encoding with torch: exporting the encoder to ONNX failed: %s", error)
        return None

    def run(pixels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {INPUT_NAME: pixels.numpy()})[0])

    expected = model.encoder(example)
    difference = float((run(example) - expected).abs().max())
    if difference > TOLERANCE * max(1.0, float(expected.abs().max())):
        log.warning("encoding with torch: the encoder's ONNX graph differs by %.2g", difference)
        return None
    log.info("linear probe: encoding on onnxruntime")
    return run


@dataclass(frozen=True)
class ProbeResult:
    """The probe's logits for the val part (in split order), to judge it as a candidate,
    and its per-epoch history."""

    val_logits: torch.Tensor
    history: list[dict[str, float]]


def linear_probe(
    model: ImageClassifier,
    datamodule: ImageDataModule,
    recipe: Recipe,
    *,
    epochs: int,
    seed: int,
) -> ProbeResult:
    """Train ``model.head`` for ``epochs`` on cached train features.

    The history has one entry per epoch: ``train_loss`` (the mean over its batches),
    ``val_loss`` and ``val_accuracy`` (the head after that epoch), the quantities Lightning
    logs for the epochs that follow, so the probe reads as the frozen phase of the curves.
    """
    start = time.perf_counter()
    train_loader, val_loader = datamodule.eval_loader("train"), datamodule.eval_loader("val")
    encoder = frozen_encoder(model, images=len(train_loader.dataset) + len(val_loader.dataset))
    train_x, train_y = encode(encoder, train_loader)
    val_x, val_y = encode(encoder, val_loader)
    head = model.head
    batch_size = datamodule.batch_size
    steps_per_epoch = max(1, len(train_x) // batch_size)
    optimizer, schedule = build_optimizer(
        param_groups(head, lr=recipe.lr, weight_decay=recipe.weight_decay),
        recipe,
        total_steps=epochs * steps_per_epoch,
        warmup_steps=int(recipe.warmup_epochs * steps_per_epoch),
    )
    loss_fn = build_loss(recipe)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        head.train()
        order = torch.randperm(len(train_x), generator=generator)
        losses = []
        for step in range(steps_per_epoch):
            batch = order[step * batch_size : (step + 1) * batch_size]
            loss = loss_fn(head(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        scores = validate(head, val_x, val_y, loss_fn)
        history.append({"train_loss": statistics.fmean(losses), **scores})
    head.eval()
    with torch.no_grad():
        val_logits = head(val_x)
    model.train()  # hand Lightning the model in the mode it expects at the start of fit
    log.info("linear probe: %d epochs on %d cached features in %.1f s, val accuracy %.4f",
             epochs, len(train_x), time.perf_counter() - start,
             history[-1]["val_accuracy"])  # fmt: skip
    return ProbeResult(
        val_logits=val_logits,
        history=[{key: round(value, 6) for key, value in epoch.items()} for epoch in history],
    )


@torch.no_grad()
def validate(
    head: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor, loss_fn: torch.nn.Module
) -> dict[str, float]:
    """Val loss and accuracy of ``head`` (in eval mode) on cached features."""
    head.eval()
    logits = head(features)
    return {
        "val_loss": float(loss_fn(logits, labels)),
        "val_accuracy": accuracy(labels.numpy(), logits.argmax(1).numpy()),
    }
