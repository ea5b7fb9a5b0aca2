"""Callbacks: cross-cutting behaviour kept out of the LightningModule."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import partial

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning, WeightAveraging
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from convtune.models.factory import first_stages

# The run's own story goes to convtune's log, once per run however many processes train it.
_log_info = rank_zero_only(logging.getLogger("convtune").info)


class EncoderFreeze(BaseFinetuning):
    """Train only the head for the first ``freeze_epochs`` epochs, then the whole model.

    While frozen, the encoder is a fixed feature extractor: no gradients, and its
    BatchNorm layers stay in eval mode so their running statistics (learned on ImageNet)
    are not dragged towards a few small batches of new data before the head is sensible.

    With ``keep_bn_eval`` the BatchNorm layers stay in eval mode after unfreezing too: their
    scales and shifts still learn, but they normalise with the pretrained statistics, so
    the features the head was trained on do not jump when fine-tuning starts (small
    batches of images unlike ImageNet's, e.g. grayscale, give very different batch stats).

    With ``freeze_stages`` N the encoder's first N stages (stem included, see
    :func:`models.factory.encoder_stages`) stay frozen after unfreezing, BatchNorm in eval
    mode: their generic low-level features are kept as pretrained, and backward passes stop
    before them, which makes fine-tuning steps cheaper. Their parameters get no gradients,
    so the optimizer skips them and keeps no state for them.

    Of ``BaseFinetuning`` this uses the hooks (``freeze_before_training`` at setup,
    ``finetune_function`` at every epoch start), not its ``freeze`` or
    ``unfreeze_and_add_param_group``, for two reasons:

    - Unfreezing adds no param group. The encoder's groups are in the optimizer from the
      first step (``module.model_param_groups``), at a learning-rate multiplier of 0 until
      ``freeze_epochs``, then warming up a second time (``module.delayed_warmup_cosine``).
      The per-step ``LambdaLR`` holds one multiplier per group it was built with, so a
      group added at unfreezing would keep a constant rate: no warmup, no cosine decay.
    - ``freeze`` switches BatchNorm to ``track_running_stats=False``, which in train mode
      normalises with each batch's statistics; a frozen layer here stays in eval mode and
      normalises with its pretrained ones.
    """

    def __init__(
        self, freeze_epochs: int, *, keep_bn_eval: bool = False, freeze_stages: int = 0
    ) -> None:
        super().__init__()
        self.freeze_epochs = freeze_epochs
        self.keep_bn_eval = keep_bn_eval
        self.freeze_stages = freeze_stages
        self._frozen_modules: list[nn.Module] = []

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        """Find the stages that never learn (a bad ``freeze_stages`` fails here)."""
        self._frozen_modules = first_stages(pl_module.model.encoder, self.freeze_stages)

    def finetune_function(
        self, pl_module: L.LightningModule, epoch: int, optimizer: torch.optim.Optimizer
    ) -> None:
        """Set what learns in ``epoch`` and which BatchNorm layers hold their statistics."""
        encoder = pl_module.model.encoder
        frozen = epoch < self.freeze_epochs
        was_frozen = not any(parameter.requires_grad for parameter in encoder.parameters())
        encoder.requires_grad_(not frozen)
        encoder.train(not frozen)
        hold_frozen(encoder.modules() if self.keep_bn_eval else [], train=True)
        hold_frozen(self._frozen_modules, train=False)
        if frozen and not was_frozen:
            _log_info(f"Encoder frozen for epochs 0-{self.freeze_epochs - 1}")
        elif was_frozen and not frozen:
            kept = f" except its first {self.freeze_stages} stage(s)" if self.freeze_stages else ""
            _log_info(f"Encoder unfrozen at epoch {epoch}{kept}")


def hold_frozen(modules: Iterable[nn.Module], *, train: bool) -> None:
    """Put the BatchNorm layers among ``modules`` in eval mode and, unless ``train``, stop
    gradients to the modules' own tensors (only their own: a container such as ``blocks``
    in a stage's module list spans later stages too)."""
    for module in modules:
        if not train:
            for parameter in module.parameters(recurse=False):
                parameter.requires_grad_(False)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class WeightEMA(WeightAveraging):
    """An exponential moving average (EMA) of the weights, which is what gets validated and kept.

    Lightning's ``WeightAveraging`` swaps the average in for validation, so checkpoints are
    chosen by its metrics; saves it as a checkpoint's ``state_dict`` (the trained weights go
    to ``current_model_state``, which resuming continues from); and leaves it in the model
    when training ends. Buffers are averaged too, so BatchNorm statistics follow the weights
    they normalise for (see :func:`ema_update`).

    The average spans about ``1 / (1 - decay)`` optimizer steps: pick ``decay`` about
    ``1 - 1 / (steps in a few epochs)``, e.g. 0.99 for 50 steps per epoch. A larger one keeps
    weights from too long ago, when the model was still much worse.
    """

    def __init__(self, decay: float) -> None:
        super().__init__(multi_avg_fn=partial(ema_update, decay=decay))


@torch.no_grad()
def ema_update(
    averages: list[torch.Tensor],
    currents: list[torch.Tensor],
    num_averaged: torch.Tensor,
    *,
    decay: float,
) -> None:
    """One EMA step over tensors of one device and dtype (``AveragedModel``'s ``multi_avg_fn``).

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, as in
    TensorFlow's ``ExponentialMovingAverage``, so the first weights, from before the model
    learned much, fade out quickly. Integer buffers (BatchNorm's ``num_batches_tracked``)
    are counters, not estimates: they are copied.
    """
    if not averages[0].is_floating_point():
        for average, current in zip(averages, currents, strict=True):
            average.copy_(current)
        return
    updates = int(num_averaged)
    warm_decay = min(decay, (1 + updates) / (10 + updates))
    torch._foreach_lerp_(averages, currents, 1.0 - warm_decay)
