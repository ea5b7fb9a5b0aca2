"""Re-estimate the encoder's BatchNorm statistics on the new data before the frozen phase.

A pretrained encoder normalises with ImageNet's statistics. While it is frozen (eval mode)
the head learns on features computed with them; once it is unfrozen (train mode) every
BatchNorm layer normalises with the statistics of the current batch of the new data
instead, and for data unlike ImageNet (grayscale cells, X-rays, documents) the features
the head was trained on shift at once: validation accuracy drops for epochs after
unfreezing. Estimating the running statistics on training images first makes the frozen
phase see what fine-tuning will see (AdaBN, Li et al. 2016); only the statistics change,
no learned weight does.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def recalibrate_batchnorm(encoder: nn.Module, loader: DataLoader, *, max_batches: int) -> int:
    """Replace every BatchNorm layer's running mean and variance with their average over
    up to ``max_batches`` batches of ``loader``; return the number of images seen."""
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [norm.momentum for norm in norms]
    was_training = encoder.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches seen
    encoder.train()
    seen = 0
    try:
        for pixels, _ in itertools.islice(loader, max_batches):
            encoder(pixels.to(memory_format=torch.channels_last))
            seen += len(pixels)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        encoder.train(was_training)
    return seen
