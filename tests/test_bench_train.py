"""A smoke run of ``convtune bench train`` on a tiny model and dataset, every part real.

Checks that the benchmark runs end to end and reports what it measured; the figures
themselves are in docs/benchmarks.md (benchmarks are not timed tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from convtune.training.devices import choose_precision

REPO = Path(__file__).resolve().parents[1]


def test_bench_train_runs_every_part_and_reports_them(tmp_path: Path) -> None:
    report_file = tmp_path / "train.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "convtune", "bench", "train",
            "--model", "test_resnet", "--pretrained", "none", "--img-size", "32",
            "--per-class", "8", "--batch-size", "4", "--num-workers", "0",
            "--steps", "2", "--skip-steps", "1", "--pipeline-batches", "3",
            "--freeze-epochs", "2", "--rounds", "1", "--json", str(report_file),
            "--parts", "steps,pipeline,frozen,features",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_file.read_text())
    median = report["median"]
    assert report["benchmark"] == "train" and len(report["rounds"]) == 1
    assert median["steps"]["lightning_images_per_s"] > 0
    assert median["steps"]["plain_images_per_s"] > 0
    assert median["pipeline"]["images_per_s"] > 0
    assert median["frozen"]["normal_s"] > 0 and median["frozen"]["probe_s"] > 0
    # 2 val images per class (8 × the default val fraction, 0.2, rounded): 6 in all, so an
    # accuracy counts them (the probe's is rounded to 6 decimals).
    for mode in ("normal", "probe"):
        correct = median["frozen"][f"{mode}_val_accuracy"] * 6
        assert correct == pytest.approx(round(correct), abs=1e-4), median["frozen"]
    features = median["features"]
    assert features["images"] == 24  # 3 shapes x 8, no test part
    assert features["onnxruntime_s"] > features["export_s"] > 0 and features["torch_s"] > 0
    # One round: each ratio is the quotient of that round's figures.
    steps, frozen = median["steps"], median["frozen"]
    assert median["ratios"] == pytest.approx(
        {
            "lightning_vs_plain": steps["lightning_images_per_s"] / steps["plain_images_per_s"],
            "pipeline_vs_model": median["pipeline"]["images_per_s"]
            / steps["lightning_images_per_s"],
            "probe_speedup": frozen["normal_s"] / frozen["probe_s"],
            "onnx_encoding_speedup": features["torch_s"] / features["onnxruntime_s"],
        },
        rel=1e-12,
    )
    assert "frozen epochs, cached features" in result.stdout
    assert "on onnxruntime, export included" in result.stdout


def test_bench_train_times_bf16_against_fp32_and_reports_the_cpu(tmp_path: Path) -> None:
    # Without the compiled variant: a cold inductor compile takes minutes on a small CPU
    # (docs/benchmarks.md has its figures; tests/test_precision.py checks the compiled step).
    report_file = tmp_path / "precision.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "convtune", "bench", "train", "--parts", "precision",
            "--variants", "bf16,fp32", "--model", "test_resnet", "--pretrained", "none",
            "--img-size", "32", "--batch-size", "4", "--steps", "2", "--skip-steps", "1",
            "--rounds", "1", "--json", str(report_file),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_file.read_text())
    precision = report["median"]["precision"]
    assert set(precision) == {"fp32_images_per_s", "bf16_images_per_s", "load_average"}
    assert min(precision["fp32_images_per_s"], precision["bf16_images_per_s"]) > 0
    bf16_vs_fp32 = precision["bf16_images_per_s"] / precision["fp32_images_per_s"]
    assert report["median"]["ratios"] == pytest.approx({"bf16_vs_fp32": bf16_vs_fp32}, rel=1e-12)
    # The table shows the report's CPU flags and the precision fit would choose here
    # (which precision the flags call for: tests/test_precision.py).
    flags = ", ".join(report["machine"]["cpu_flags"])
    chosen = choose_precision("auto", accelerator="cpu")
    assert f"CPU flags: {flags}; --precision auto: {chosen}\n" in result.stdout
    # Lightning's own notices (which accelerators exist, its cloud advertisement) stay out.
    assert "GPU available" not in result.stderr and "litlogger" not in result.stderr
