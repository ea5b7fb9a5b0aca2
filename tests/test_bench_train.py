"""A smoke run of ``convtune bench train`` on a tiny model and dataset, every part real.

Checks that the benchmark runs end to end and reports what it measured; the figures
themselves are in docs/benchmarks.md (benchmarks are not timed tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    for mode in ("normal", "probe"):
        assert 0.0 <= median["frozen"][f"{mode}_val_accuracy"] <= 1.0
    features = median["features"]
    assert features["images"] == 24  # 3 shapes x 8, no test part
    assert features["onnxruntime_s"] > features["export_s"] > 0 and features["torch_s"] > 0
    assert set(median["ratios"]) == {
        "lightning_vs_plain",
        "pipeline_vs_model",
        "probe_speedup",
        "onnx_encoding_speedup",
    }
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
    assert set(report["median"]["ratios"]) == {"bf16_vs_fp32"}
    chosen = choose_precision("auto", accelerator="cpu")
    assert f"--precision auto: {chosen}" in result.stdout
    # The report carries the flags the choice was made from.
    native = {"avx512_bf16", "amx_bf16"} & set(report["machine"]["cpu_flags"])
    assert (chosen.precision == "bf16-mixed") == bool(native), report["machine"]["cpu_flags"]
    # Lightning's own notices (which accelerators exist, its cloud advertisement) stay out.
    assert "GPU available" not in result.stderr and "litlogger" not in result.stderr
