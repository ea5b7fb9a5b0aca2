"""The exported graph's view inside the network: each stage's volume of feature maps and,
for a linear head on an average-pooled volume, the class activation maps (CAM, Zhou et al.
2016).

The head maps the pooled feature vector to logits: ``logit_c = W_c · mean_xy F[:, y, x] +
b_c``. Because the mean and the head are both linear, ``W_c · F[:, y, x] + b_c`` at each
position averages to the logit exactly: that map shows where the evidence for class c
lies. Other heads (a hidden layer, dropout kept in) or other pooling break the identity, so
their graph gives stages only and their maps come from Grad-CAM (``training.explain``).

The volumes' parameters and multiply-adds are counted here, in torch, and recorded in the
manifest, so ``convtune inspect`` needs the artifact alone.
"""

from __future__ import annotations

import torch
from torch import nn

from convtune.models.artifact import (
    CLASS_MAPS_NAME,
    EXPLAIN_ONNX_FILE,
    STAGE_NAME,
    ExplainOutputs,
    FeatureVolume,
)
from convtune.models.factory import ImageClassifier, encoder_stages

# How close the mean of a class map must come to its logit for the maps to count as exact.
IDENTITY_TOLERANCE = 1e-4


class ExplainedClassifier(nn.Module):
    """``model``'s logits, then (when ``with_class_maps``) its class maps, then the volume
    at the end of each encoder stage, in one forward pass."""

    def __init__(self, model: ImageClassifier, *, with_class_maps: bool) -> None:
        super().__init__()
        self.model = model
        self.with_class_maps = with_class_maps

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        encoder = self.model.encoder
        features, stages = encoder.forward_intermediates(pixels)
        logits = self.model.head(encoder.forward_head(features))
        maps = (class_maps(self.model.head[-1], features),) if self.with_class_maps else ()
        return (logits, *maps, *stages)


def class_maps(linear: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    """``(N, C, h, w)``: the linear head applied at every position of ``(N, F, h, w)``."""
    maps = torch.einsum("nfhw,cf->nchw", features, linear.weight)
    return maps + linear.bias[None, :, None, None]


def has_exact_class_maps(model: ImageClassifier, probe: torch.Tensor) -> bool:
    """Whether the head is one linear layer on an average-pooled volume, so that each class
    map averages to its logit; checked on ``probe`` as well as by structure, since an
    encoder's ``forward_head`` may do more than pool (a norm layer, say)."""
    pooling = getattr(model.encoder, "global_pool", None)
    if not (
        len(model.head) == 1
        and isinstance(model.head[0], nn.Linear)
        and getattr(pooling, "pool_type", None) == "avg"
    ):
        return False
    with torch.no_grad():
        features = model.encoder.forward_features(probe)
        if features.ndim != 4:
            return False
        averaged = class_maps(model.head[0], features).mean(dim=(2, 3))
        return bool((averaged - model(probe)).abs().max() <= IDENTITY_TOLERANCE)


def describe_volumes(model: ImageClassifier, *, with_class_maps: bool) -> ExplainOutputs:
    """The manifest's ``explain``: each stage's volume at the model's input size (one image),
    with the parameters and the multiply-adds (convolutions and fully connected layers) of
    the layers that compute it."""
    encoder = model.encoder
    stage_modules = encoder_stages(encoder)
    owner = {id(module): k for k, modules in enumerate(stage_modules) for module in modules}
    tail = len(stage_modules)  # after the last stage, before pooling
    parameters = [0] * (tail + 1)
    for module in encoder.modules():
        held = sum(p.numel() for p in module.parameters(recurse=False))
        parameters[owner.get(id(module), tail)] += held
    height, width = model.preprocessing.input_size
    macs = [0] * (tail + 1)
    head_macs = [0]

    def counter(totals: list[int], index: int):
        def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            totals[index] += multiply_adds(module, output)

        return count

    hooks = [
        module.register_forward_hook(counter(macs, owner.get(id(module), tail)))
        for module in encoder.modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    ] + [
        module.register_forward_hook(counter(head_macs, 0))
        for module in model.head.modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        with torch.no_grad():
            features, stages = encoder.forward_intermediates(torch.zeros(1, 3, height, width))
            model.head(encoder.forward_head(features))
    finally:
        for hook in hooks:
            hook.remove()
    info = encoder.feature_info
    volumes = [
        _volume(STAGE_NAME.format(k + 1), volume, info[k]["reduction"], parameters[k], macs[k])
        for k, volume in enumerate(stages)
    ]
    return ExplainOutputs(
        graph=EXPLAIN_ONNX_FILE,
        class_maps=CLASS_MAPS_NAME if with_class_maps else None,
        stages=tuple(volumes),
        features=_volume(None, features, info[-1]["reduction"], parameters[tail], macs[tail]),
        pooling=str(getattr(encoder.global_pool, "pool_type", type(encoder.global_pool).__name__)),
        head_parameters=sum(p.numel() for p in model.head.parameters()),
        head_macs=head_macs[0],
    )


def _volume(
    output: str | None, volume: torch.Tensor, stride: int, parameters: int, macs: int
) -> FeatureVolume:
    channels, height, width = volume.shape[1:]
    return FeatureVolume(
        output=output, channels=channels, stride=int(stride), height=height, width=width,
        parameters=parameters, macs=macs,
    )  # fmt: skip


def multiply_adds(module: nn.Module, output: torch.Tensor) -> int:
    """One image's multiply-adds in a convolution or fully connected layer: each output
    value sums one product per input it sees."""
    per_output = (
        module.in_features
        if isinstance(module, nn.Linear)
        else module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    )
    return output[0].numel() * per_output
