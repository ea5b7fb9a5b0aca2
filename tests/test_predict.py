"""``convtune predict`` runs the ONNX graph without loading torch or albumentations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from convtune.data.synthetic import draw_shape

HEAVY = ("torch", "lightning", "timm", "albumentations")


def test_predict_loads_none_of_the_training_stack(artifact_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "square.png"
    draw_shape("square", np.random.default_rng(0)).save(image)
    code = (
        "import json, sys\n"
        "from convtune.training.cli import main\n"
        f"status = main(['predict', {str(artifact_dir)!r}, {str(image)!r}])\n"
        f"print(json.dumps([status, [name for name in {HEAVY!r} if name in sys.modules]]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    *answer, last = result.stdout.strip().splitlines()
    status, loaded = json.loads(last)
    assert status == 0 and loaded == []
    assert json.loads("\n".join(answer))["results"][0]["image"] == str(image)
