"""create_model: timm encoder + head, explicit init, local weight files."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import resolve_model_data_config

from convtune.data.preprocessing import Preprocessing
from convtune.models.factory import HeadConfig, create_model, rebuild_model
from convtune.models.head import OUTPUT_INIT_STD, build_head
from convtune.models.packaged import WeightsError


@pytest.mark.parametrize(
    ("activation", "expected_variance"),
    [("relu", lambda i, o: 2 / i), ("gelu", lambda i, o: 2 / i),
     ("tanh", lambda i, o: 2 / (i + o)), ("sigmoid", lambda i, o: 2 / (i + o))],
)  # fmt: skip
def test_head_init_variances(activation: str, expected_variance) -> None:
    torch.manual_seed(0)
    fan_in, hidden, classes = 512, 1024, 10
    head = build_head(fan_in, classes, hidden_features=hidden, activation=activation)
    hidden_layer, output_layer = head[0], head[-1]
    measured = hidden_layer.weight.var().item()
    assert measured == pytest.approx(expected_variance(fan_in, hidden), rel=0.05)
    assert output_layer.weight.std().item() == pytest.approx(OUTPUT_INIT_STD, rel=0.05)
    assert torch.count_nonzero(output_layer.weight) == output_layer.weight.numel()


def test_model_is_its_head_on_the_encoders_pooled_features() -> None:
    head = HeadConfig(hidden_features=16, dropout=0.1, activation="relu")
    model = create_model("test_vit", 4, pretrained="none", img_size=64, head=head).eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    # test_vit pools by its class token (global_pool "token"), the first of its tokens.
    pooled = model.encoder.forward_features(pixels)[:, 0]
    hidden_layer, output_layer = model.head[0], model.head[-1]
    # The head by hand: Linear, ReLU, then (dropout, off in eval) the output Linear.
    hidden = torch.clamp(pooled @ hidden_layer.weight.T + hidden_layer.bias, min=0)
    by_hand = hidden @ output_layer.weight.T + output_layer.bias
    with torch.no_grad():
        logits = model(pixels)
    assert logits.shape == (2, 4)
    torch.testing.assert_close(logits, by_hand, rtol=1e-5, atol=1e-6)
    # A model rebuilt from its description and given its weights computes the same.
    rebuilt = rebuild_model(model.structure).eval()
    rebuilt.load_state_dict(model.state_dict())  # same structure, strict
    with torch.no_grad():
        assert torch.equal(rebuilt(pixels), logits)


def test_preprocessing_is_timms_pretrained_config_with_the_size_asked_for() -> None:
    # test_vit's config differs from Preprocessing's defaults (crop_pct 0.95, not 0.875).
    timm_config = timm.models.get_pretrained_cfg("test_vit")
    model = create_model("test_vit", 4, pretrained="none", img_size=64)
    assert model.preprocessing == Preprocessing(
        input_size=(64, 64), mean=timm_config.mean, std=timm_config.std,
        interpolation=timm_config.interpolation, crop_pct=timm_config.crop_pct,
        crop_mode=timm_config.crop_mode,
    )  # fmt: skip
    assert timm_config.crop_pct == 0.95 and timm_config.input_size == (3, 160, 160)


def test_timm_reads_the_models_own_preprocessing() -> None:
    # tf_efficientnet_lite0 normalises with 0.5, not ImageNet's 0.485/0.456/0.406.
    model = create_model("tf_efficientnet_lite0", 3)
    own = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
           "std": (0.5, 0.5, 0.5), "crop_pct": 0.875, "crop_mode": "center"}  # fmt: skip
    assert resolve_model_data_config(model) == own
    assert model.preprocessing.mean == own["mean"]  # what convtune normalises with
    # An overridden eval view is what timm reads, with or without its test-time size, and
    # so is the view of a model rebuilt from its description.
    model = create_model("tf_efficientnet_lite0", 3, img_size=160, crop_pct=1.0,
                         crop_mode="border")  # fmt: skip
    overridden = {**own, "input_size": (3, 160, 160), "crop_pct": 1.0, "crop_mode": "border"}
    assert resolve_model_data_config(model) == overridden
    assert resolve_model_data_config(model, use_test_size=True) == overridden
    assert resolve_model_data_config(rebuild_model(model.structure)) == overridden
    # The module names in the config are this model's.
    assert model.get_submodule(model.pretrained_cfg["classifier"]) is model.head[-1]
    assert model.get_submodule(model.pretrained_cfg["first_conv"]) is model.encoder.conv_stem
    assert model.pretrained_cfg["num_classes"] == 3


def test_a_model_name_may_carry_timms_pretrained_tag() -> None:
    model = create_model("test_resnet.r160_in1k", 3)
    assert model.architecture == "test_resnet.r160_in1k"
    assert model.preprocessing.input_size == (160, 160)


@pytest.fixture(scope="module")
def pretrained_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 'pretrained' test_efficientnet with a 1000-class head, saved both ways."""
    torch.manual_seed(1)
    source = timm.create_model("test_efficientnet", num_classes=1000)
    directory = tmp_path_factory.mktemp("weights")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, directory / "weights.safetensors")
    torch.save(state, directory / "weights.pth")
    return {"safetensors": directory / "weights.safetensors", "pth": directory / "weights.pth",
            "state": state}  # fmt: skip


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_local_weight_file_loads_encoder_and_drops_mismatched_head(pretrained_files, kind):
    state = pretrained_files["state"]
    model = create_model("test_efficientnet", 3, pretrained=str(pretrained_files[kind]))
    assert torch.equal(model.encoder.conv_stem.weight, state["conv_stem.weight"])
    assert model.head[-1].weight.shape == (3, model.encoder.num_features)
    assert model.head[-1].weight.std().item() == pytest.approx(OUTPUT_INIT_STD, rel=0.3)


def test_pretrained_classifier_is_kept_for_the_same_classes(pretrained_files) -> None:
    state = pretrained_files["state"]
    model = create_model("test_efficientnet", 1000, pretrained=str(pretrained_files["pth"]))
    assert torch.equal(model.head[-1].weight, state["classifier.weight"])
    reference = timm.create_model("test_efficientnet", num_classes=1000).eval()
    reference.load_state_dict(state)
    pixels = torch.randn(2, 3, 64, 64)
    assert torch.allclose(model.eval()(pixels), reference(pixels), atol=1e-5)


def test_weight_source_errors() -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        create_model("test_efficientnet", 3, pretrained="/no/such/file.safetensors")
    with pytest.raises(ValueError, match="unknown timm model"):
        create_model("no_such_net", 3)
