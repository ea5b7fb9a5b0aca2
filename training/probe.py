"""The frozen phase as a linear probe on cached features.

While the encoder is frozen and in eval mode, its output for an un-augmented image never
changes, so running it once per image is enough: encode the train split once, then train
the head for the frozen epochs on the stored feature vectors, which costs almost nothing
per epoch. The probe sees un-augmented images (the normal frozen epochs see augmented
ones); ``benchmarks/train.py`` compares the two.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from data.datamodule import ImageDataModule
from models.factory import ImageClassifier
from training.module import Recipe, build_loss, build_optimizer, param_groups

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
    """The probe's logits for the val part (in split order), to judge it as a candidate."""

    val_logits: torch.Tensor
    val_accuracy: float


def linear_probe(
    model: ImageClassifier,
    datamodule: ImageDataModule,
    recipe: Recipe,
    *,
    epochs: int,
    seed: int,
) -> ProbeResult:
    """Train ``model.head`` for ``epochs`` on cached train features."""
    start = time.perf_counter()
    train_x, train_y = encode(model, datamodule.eval_loader("train"))
    val_x, val_y = encode(model, datamodule.eval_loader("val"))
    head = model.head.train()
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
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * batch_size : (step + 1) * batch_size]
            loss = loss_fn(head(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    head.eval()
    with torch.no_grad():
        val_logits = head(val_x)
    accuracy = float((val_logits.argmax(1) == val_y).float().mean())
    model.train()  # hand Lightning the model in the mode it expects at the start of fit
    log.info("linear probe: %d epochs on %d cached features in %.1f s, val accuracy %.4f",
             epochs, len(train_x), time.perf_counter() - start, accuracy)  # fmt: skip
    return ProbeResult(val_logits=val_logits, val_accuracy=accuracy)
