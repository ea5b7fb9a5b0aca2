"""The frozen phase as a linear probe on cached features.

While the encoder is frozen and in eval mode, its output for an un-augmented image never
changes, so running it once per image is enough: encode the train split once, then train
the head for the frozen epochs on the stored feature vectors, which costs almost nothing
per epoch. The probe sees un-augmented images (the normal frozen epochs see augmented
ones); ``benchmarks/train.py`` compares the two.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from convtune.data.datamodule import ImageDataModule
from convtune.models.factory import ImageClassifier
from convtune.training.metrics import accuracy
from convtune.training.module import Recipe, build_loss, build_optimizer, param_groups

log = logging.getLogger("convtune")


@torch.no_grad()
def encode(model: ImageClassifier, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder features (eval mode) and labels for every image of ``loader``."""
    model.encoder.eval()
    features, labels = [], []
    for pixels, target in loader:
        features.append(model.encoder(pixels))
        labels.append(torch.as_tensor(target))
    return torch.cat(features), torch.cat(labels)


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
    train_x, train_y = encode(model, datamodule.eval_loader("train"))
    val_x, val_y = encode(model, datamodule.eval_loader("val"))
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
