"""Callbacks: cross-cutting behaviour kept out of the LightningModule."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import nn


class EncoderFreeze(L.Callback):
    """Train only the head for the first ``freeze_epochs`` epochs, then the whole model.

    While frozen, the encoder is a fixed feature extractor: no gradients, and its
    BatchNorm layers stay in eval mode so their running statistics (learned on ImageNet)
    are not dragged towards a few small batches of new data before the head is sensible.

    With ``keep_bn_eval`` the BatchNorm layers stay in eval mode after unfreezing too: their
    scales and shifts still learn, but they normalise with the pretrained statistics, so
    the features the head was trained on do not jump when fine-tuning starts (small
    batches of images unlike ImageNet's, e.g. grayscale, give very different batch stats).
    """

    def __init__(self, freeze_epochs: int, *, keep_bn_eval: bool = False) -> None:
        self.freeze_epochs = freeze_epochs
        self.keep_bn_eval = keep_bn_eval

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        encoder = pl_module.model.encoder
        frozen = trainer.current_epoch < self.freeze_epochs
        was_frozen = not next(encoder.parameters()).requires_grad
        encoder.requires_grad_(not frozen)
        encoder.train(not frozen)
        if self.keep_bn_eval:
            for module in encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        if frozen and not was_frozen:
            rank_zero_info(f"Encoder frozen for epochs 0-{self.freeze_epochs - 1}")
        elif was_frozen and not frozen:
            rank_zero_info(f"Encoder unfrozen at epoch {trainer.current_epoch}")
