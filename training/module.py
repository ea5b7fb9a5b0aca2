"""The LightningModule: the fine-tuning recipe and nothing else.

Cross-entropy (optional label smoothing and class weights, see :class:`SmoothedCrossEntropy`);
SGD with Nesterov momentum by default, because momentum damps the zig-zag of plain SGD
across ravines of the loss surface, or AdamW; linear warmup then cosine decay, stepped per
batch; no weight decay on norms and biases (decaying a BatchNorm scale only fights its own
normalisation); the encoder learns at ``backbone_lr_scale`` × the head's rate so pretrained
features move slowly while the new head catches up.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from convtune.models.artifact import ModelStructure
from convtune.models.factory import ImageClassifier, rebuild_model


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """The optimisation recipe. Its settings have no defaults here: they are FitConfig's
    (``Recipe(**config.recipe_kwargs())``), so each default lives in one place."""

    lr: float
    backbone_lr_scale: float
    optimizer: str
    momentum: float
    weight_decay: float
    warmup_epochs: float
    label_smoothing: float
    # Set by fit from the training data, when FitConfig's class_weights is auto.
    class_weights: tuple[float, ...] | None
    # Epochs before the encoder learns: its learning rate warms up again from there, so
    # the first unfrozen steps do not hit pretrained weights at the peak rate.
    freeze_epochs: int

    def after_probe(self) -> Recipe:
        """The recipe for fine-tuning a model whose head a linear probe has trained: the
        head learns at the encoder's rate. At its own peak rate again, on features that
        start to move, it would leave the probe's solution (docs/benchmarks.md, ELPV)."""
        return replace(self, lr=self.lr * self.backbone_lr_scale, backbone_lr_scale=1.0)


class ClassifierModule(L.LightningModule):
    """The recipe around ``model``; ``training_step`` calls the model itself.

    A checkpoint describes itself in plain data, which ``weights_only`` loading accepts:
    its hyperparameters are the model's structure (:attr:`ImageClassifier.structure`, not
    the model object) and the recipe, so ``ClassifierModule.load_from_checkpoint(path,
    weights_only=True)`` rebuilds both; pass ``model=`` to load into an existing model.
    """

    def __init__(
        self, model: ImageClassifier | dict[str, Any], recipe: Recipe | dict[str, Any]
    ) -> None:
        super().__init__()
        if not isinstance(model, ImageClassifier):
            model = rebuild_model(ModelStructure.from_json(model))
        self.model = model
        self.recipe = recipe if isinstance(recipe, Recipe) else Recipe(**recipe)
        # Not sent to the logger: the run's config.yaml already records the settings.
        self.save_hyperparameters(
            {"model": self.model.structure.to_json(), "recipe": asdict(self.recipe)},
            logger=False,
        )
        self.loss = build_loss(self.recipe)
        num_classes = self.model.num_classes
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_macro_f1 = MulticlassF1Score(num_classes, average="macro")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        pixels, labels = batch
        logits = self.model(pixels)
        loss = self.loss(logits, labels)
        self._record_training(logits.detach(), labels, loss.detach())
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        pixels, labels = batch
        logits = self.model(pixels)
        self._record_validation(logits, labels, self.loss(logits, labels))

    # The metrics and logging run outside torch.compile (--compile): a metric's step
    # counter would change a compiled step's guards every step, recompiling it each time.

    @torch.compiler.disable
    def _record_training(
        self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor
    ) -> None:
        self.train_accuracy(logits, labels)
        # sync_dist: with several training processes, the loss over all of their batches.
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self.log("train/accuracy", self.train_accuracy, on_step=False, on_epoch=True)

    @torch.compiler.disable
    def _record_validation(
        self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor
    ) -> None:
        self.val_accuracy(logits, labels)
        self.val_macro_f1(logits, labels)
        # Averaged over every training process, as the metric objects are when computed:
        # checkpointing and early stopping then decide the same in each.
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/accuracy", self.val_accuracy, prog_bar=True)
        self.log("val/macro_f1", self.val_macro_f1, prog_bar=True)

    def configure_optimizers(self) -> dict:
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = total_steps / max(1, self.trainer.max_epochs or 1)
        optimizer, schedule = build_optimizer(
            model_param_groups(
                self.model,
                self.recipe,
                encoder_start_step=int(self.recipe.freeze_epochs * steps_per_epoch),
            ),
            self.recipe,
            total_steps=total_steps,
            warmup_steps=int(self.recipe.warmup_epochs * steps_per_epoch),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step"},
        }


def build_loss(recipe: Recipe) -> SmoothedCrossEntropy:
    weight = torch.tensor(recipe.class_weights) if recipe.class_weights else None
    return SmoothedCrossEntropy(weight=weight, label_smoothing=recipe.label_smoothing)


class SmoothedCrossEntropy(nn.Module):
    """Cross-entropy against smoothed targets, each sample weighted by its true class.

    The target is ``(1 - ε)·one_hot + ε/K``; the loss is ``Σ w_i·loss_i / Σ w_i`` with
    ``w_i = weight[label_i]``, the weighted mean ``nn.CrossEntropyLoss`` uses. Unlike
    ``nn.CrossEntropyLoss(weight=..., label_smoothing=...)``, which also weights each class's
    share of the smoothing term (pytorch/pytorch#104776), a class weight only says how much a
    sample counts, so the loss is always lowest at the smoothed target itself instead of
    pushing smoothing mass towards heavily weighted (rare) classes. Without weights it equals
    ``nn.CrossEntropyLoss(label_smoothing=ε)``.
    """

    def __init__(self, *, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        # A buffer named like nn.CrossEntropyLoss's, so checkpoints keep the same keys.
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_probs = logits.log_softmax(dim=-1)
        true_class = -log_probs.gather(-1, labels[:, None]).squeeze(-1)
        uniform = -log_probs.mean(dim=-1)
        losses = (1.0 - self.label_smoothing) * true_class + self.label_smoothing * uniform
        if self.weight is None:
            return losses.mean()
        sample_weights = self.weight[labels]
        return (sample_weights * losses).sum() / sample_weights.sum()


def build_optimizer(
    groups: list[dict], recipe: Recipe, *, total_steps: int, warmup_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The recipe's optimizer over ``groups`` and its per-step warmup-cosine schedule.

    A group with a ``start_step`` warms up a second time from that step (see
    :func:`delayed_warmup_cosine`).
    """
    if recipe.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, momentum=recipe.momentum, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        [
            functools.partial(
                delayed_warmup_cosine,
                start_step=group.get("start_step", 0),
                warmup_steps=warmup_steps,
                total_steps=total_steps,
            )
            for group in groups
        ],
    )
    return optimizer, schedule


def model_param_groups(
    model: ImageClassifier, recipe: Recipe, *, encoder_start_step: int = 0
) -> list[dict]:
    """The head at ``lr``, the encoder at ``lr × backbone_lr_scale`` warming up from
    ``encoder_start_step``; see :func:`param_groups`."""
    encoder_groups = param_groups(
        model.encoder, lr=recipe.lr * recipe.backbone_lr_scale, weight_decay=recipe.weight_decay
    )
    return [
        *param_groups(model.head, lr=recipe.lr, weight_decay=recipe.weight_decay),
        *({**group, "start_step": encoder_start_step} for group in encoder_groups),
    ]


def param_groups(module: nn.Module, *, lr: float, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay; biases and norm scales (1-D tensors) without."""
    decay, no_decay = [], []
    for parameter in module.parameters():
        (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear ramp to 1 over ``warmup_steps``, then cosine down to 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def delayed_warmup_cosine(
    step: int, *, start_step: int, warmup_steps: int, total_steps: int
) -> float:
    """:func:`warmup_cosine`, times a second linear ramp over ``warmup_steps`` that starts
    at ``start_step`` (0 before it); from step 0 the first warmup is that ramp already."""
    if start_step == 0:
        return warmup_cosine(step, warmup_steps, total_steps)
    if step < start_step:
        return 0.0
    ramp = min(1.0, (step - start_step + 1) / (warmup_steps + 1))
    return ramp * warmup_cosine(step, warmup_steps, total_steps)
