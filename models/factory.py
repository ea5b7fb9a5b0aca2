"""``create_model``: a timm encoder with a new classifier head.

The encoder is ``timm.create_model(name, num_classes=0)``: everything up to and including
global pooling, so it maps an image to one feature vector. The head maps that vector to
one logit per class. Softmax is not part of the model: the logits are exported, and the
temperature-scaled softmax is applied where probabilities are reported.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import asdict, dataclass
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn

from convtune.data.preprocessing import Preprocessing
from convtune.models.artifact import ModelStructure
from convtune.models.head import build_head
from convtune.models.packaged import WeightsError
from convtune.models.weights import WeightSource, offline_hint, resolve_weight_source


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """The classifier head. No defaults: a fit's come from training's FitConfig, so each
    lives in one place; :meth:`linear` is the head timm's own classifiers have."""

    hidden_features: int
    dropout: float
    activation: str

    @classmethod
    def linear(cls) -> HeadConfig:
        """One linear layer, no dropout (``activation`` is unused without a hidden layer)."""
        return cls(hidden_features=0, dropout=0.0, activation="relu")

    def is_linear(self) -> bool:
        return self.hidden_features == 0 and self.dropout == 0.0


class ImageClassifier(nn.Module):
    """``logits = head(encoder(pixels))``; knows its own preprocessing."""

    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Sequential,
        *,
        architecture: str,
        preprocessing: Preprocessing,
        head_config: HeadConfig,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.encoder = encoder
        self.head = head
        self.architecture = architecture
        self.preprocessing = preprocessing
        self.head_config = head_config

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(pixels))

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's description of this model, so timm's tools read what convtune uses:
        ``timm.data.resolve_model_data_config(model)`` returns :attr:`preprocessing`.

        The encoder's pretrained config, with the eval view this model is trained and
        served with, its classes, and module names that resolve in this model. Derived on
        each read, so a replaced :attr:`preprocessing` (see :func:`rebuild_model`) shows.
        """
        view = self.preprocessing
        encoder_cfg = self.encoder.pretrained_cfg
        first_conv = encoder_cfg.get("first_conv")
        return {
            **encoder_cfg,
            "input_size": (3, *view.input_size),
            "interpolation": view.interpolation,
            "mean": view.mean,
            "std": view.std,
            "crop_pct": view.crop_pct,
            "crop_mode": view.crop_mode,
            # One eval view: a test-time size or crop would override it in timm's resolver.
            "test_input_size": None,
            "test_crop_pct": None,
            "num_classes": self.num_classes,
            "classifier": f"head.{len(self.head) - 1}",
            "first_conv": f"encoder.{first_conv}" if isinstance(first_conv, str) else None,
        }

    @property
    def structure(self) -> ModelStructure:
        """What :func:`rebuild_model` needs to build this model again, untrained."""
        return ModelStructure(
            architecture=self.architecture,
            num_classes=self.num_classes,
            head=asdict(self.head_config),
            preprocessing=self.preprocessing,
        )


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: str | WeightSource = "none",
    img_size: int | None = None,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
    head: HeadConfig | None = None,
) -> ImageClassifier:
    """Build ``name`` from timm with pretrained weights and a fresh ``num_classes`` head.

    ``img_size``, ``crop_pct`` and ``crop_mode`` override the encoder's pretrained eval
    view (None keeps the encoder's own).

    With ``num_classes`` equal to the pretrained classifier's (1000 for ImageNet) and a
    plain linear head, the pretrained classifier is kept instead of a new one.
    """
    if not timm.is_model(name):
        raise ValueError(
            f"unknown timm model {name!r}; see `timm.list_models()` for the available names"
        )
    source = (
        pretrained
        if isinstance(pretrained, WeightSource)
        else resolve_weight_source(pretrained, name)
    )
    head_config = head or HeadConfig.linear()
    keep_classifier = keeps_pretrained_classifier(
        name, num_classes, source=source, head=head_config
    )
    encoder = create_encoder(
        name, source=source, num_classes=num_classes if keep_classifier else 0, img_size=img_size
    )
    return ImageClassifier(
        encoder,
        detach_classifier(encoder)
        if keep_classifier
        else build_head(encoder.num_features, num_classes, **asdict(head_config)),
        architecture=name,
        preprocessing=resolve_preprocessing(
            encoder, img_size=img_size, crop_pct=crop_pct, crop_mode=crop_mode
        ),
        head_config=head_config,
        num_classes=num_classes,
    )


def keeps_pretrained_classifier(
    name: str, num_classes: int, *, source: WeightSource, head: HeadConfig
) -> bool:
    """Whether the pretrained classifier serves as the head: weights are loaded, the head
    asked for is one linear layer, and the classes are as many as it was trained on."""
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    return (
        source.kind != "none"
        and head.is_linear()
        and pretrained_cfg is not None
        and pretrained_cfg.num_classes == num_classes
    )


def create_encoder(
    name: str, *, source: WeightSource, num_classes: int = 0, img_size: int | None = None
) -> nn.Module:
    """``timm.create_model(name)`` with ``source``'s weights; ``num_classes`` 0 ends it at
    global pooling, so it maps an image to one feature vector."""
    kwargs = source.timm_kwargs()
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if img_size and pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        kwargs["img_size"] = img_size  # ViT-style models build their patch grid for a size
    try:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError) as error:
        if source.kind == "hub":
            raise WeightsError(f"{offline_hint(name)} ({error})") from error
        raise


def detach_classifier(encoder: nn.Module) -> nn.Sequential:
    """The encoder's own classifier as a head; the encoder then ends at global pooling."""
    classifier = encoder.get_classifier()
    encoder.reset_classifier(0)
    return nn.Sequential(classifier)


def encoder_stages(encoder: nn.Module) -> list[list[nn.Module]]:
    """The encoder's modules grouped into the stages that timm's ``feature_info`` names.

    Stage k holds every module registered after stage k-1's feature module, through stage
    k's feature module and its submodules, so the stem belongs to the first stage; modules
    after the last feature module (e.g. a final 1x1 convolution) belong to none. A module
    stands for the parameters and buffers it holds itself (``recurse=False``): a container
    such as ``blocks`` spans several stages and sits in the one where it is registered.
    """
    boundaries = [info["module"] for info in getattr(encoder, "feature_info", None) or []]
    modules = list(encoder.named_modules())
    ends = [
        max((i for i, (name, _) in enumerate(modules) if _within(name, boundary)), default=-1)
        for boundary in boundaries
    ]
    if not boundaries or min(ends) < 0 or ends != sorted(ends):
        raise ValueError(
            f"cannot split {type(encoder).__name__} into stages: its feature_info names "
            f"{boundaries or 'no modules'}"
        )
    stages: list[list[nn.Module]] = [[] for _ in boundaries]
    for index, (_, module) in enumerate(modules):
        stage = bisect_left(ends, index)
        if stage < len(stages):
            stages[stage].append(module)
    return stages


def first_stages(encoder: nn.Module, count: int) -> list[nn.Module]:
    """The modules of the encoder's first ``count`` stages (see :func:`encoder_stages`)."""
    if count == 0:  # no need to understand the encoder's stages, it may have none
        return []
    stages = encoder_stages(encoder)
    if count > len(stages):
        raise ValueError(
            f"freeze_stages={count}, but {type(encoder).__name__} has {len(stages)} stages"
        )
    return [module for stage in stages[:count] for module in stage]


def _within(name: str, ancestor: str) -> bool:
    return name == ancestor or name.startswith(ancestor + ".")


def resolve_preprocessing(
    encoder: nn.Module,
    *,
    img_size: int | None = None,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
) -> Preprocessing:
    """The encoder's pretrained data config, resolved by timm with the eval view's
    overrides (None keeps the encoder's own)."""
    overrides = {"img_size": img_size, "crop_pct": crop_pct, "crop_mode": crop_mode}
    config = resolve_model_data_config(encoder, args=overrides)
    return Preprocessing(
        input_size=tuple(config["input_size"][1:]),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        interpolation=config["interpolation"],
        crop_pct=float(config["crop_pct"]),
        crop_mode=config["crop_mode"],
    )


def rebuild_model(structure: ModelStructure) -> ImageClassifier:
    """An untrained model of ``structure`` (:attr:`ImageClassifier.structure`)."""
    model = create_model(
        structure.architecture,
        structure.num_classes,
        pretrained="none",
        img_size=structure.preprocessing.input_size[0],
        head=HeadConfig(**structure.head),
    )
    # Keep the recorded statistics: they came from the pretrained weights, which a
    # rebuilt (untrained) model does not know about.
    model.preprocessing = structure.preprocessing
    return model
