"""The training history: read from a real run's logs (and probe), shown in the report."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from convtune.data.synthetic import make_shapes_dataset
from convtune.models.artifact import PROBE_HISTORY_FILE
from convtune.training.cli import main
from convtune.training.history import FINE_TUNE, FROZEN, read_history
from convtune.training.report import dataset_name, report_title


def set_option(args: list[str], option: str, value: str) -> list[str]:
    args = [*args]
    args[args.index(option) + 1] = value
    return args


def fit_shapes(tmp_path: Path, fit_args: list[str], *extra: str) -> Path:
    data = make_shapes_dataset(tmp_path / "shapes", per_class=20, size=40, seed=1)
    run_dir = tmp_path / "run"
    args = [*set_option(fit_args, "--freeze-epochs", "1"), "--cache-images", *extra]
    assert main(["fit", "--data", str(data), "--out", str(run_dir), *args]) == 0
    return run_dir


def logged(metrics_file: Path, column: str) -> dict[int, list[float]]:
    """Every value of ``column`` in a Lightning ``metrics.csv``, by epoch."""
    values: dict[int, list[float]] = {}
    with metrics_file.open(newline="") as stream:
        for row in csv.DictReader(stream):
            if row[column]:
                values.setdefault(int(row["epoch"]), []).append(float(row[column]))
    return values


def epoch_values(metrics_file: Path, epoch: int) -> dict[str, float]:
    """The history's values of one epoch, as Lightning logged them in ``metrics_file``."""
    columns = {"train_loss": "train/loss_epoch", "val_loss": "val/loss",
               "val_accuracy": "val/accuracy", "val_macro_f1": "val/macro_f1"}  # fmt: skip
    values = {}
    for key, column in columns.items():
        [values[key]] = logged(metrics_file, column)[epoch]  # logged once per epoch
    return values


def test_probe_and_resumed_epochs_make_one_history_in_the_report(
    tmp_path: Path, fit_args: list[str]
) -> None:
    run_dir = fit_shapes(tmp_path, fit_args, "--cache-features")
    assert main(["fit", "--out", str(run_dir), "--resume", "--epochs", "3"]) == 0
    assert (run_dir / PROBE_HISTORY_FILE).is_file()
    assert (run_dir / "logs" / "version_1" / "metrics.csv").is_file()  # two attempts to read

    history = read_history(run_dir)
    first, resumed = (run_dir / "logs" / f"version_{n}" / "metrics.csv" for n in (0, 1))
    [probe] = json.loads((run_dir / PROBE_HISTORY_FILE).read_text())
    # The probe ran epoch 0 (it computes no macro-F1). Lightning counts from 0 again after
    # it: the first attempt's epoch 0 is epoch 1, the resumed attempt's epoch 1 is epoch 2.
    assert history == [
        {"epoch": 0, "phase": FROZEN, **probe, "val_macro_f1": None},
        {"epoch": 1, "phase": FINE_TUNE, **epoch_values(first, 0)},
        {"epoch": 2, "phase": FINE_TUNE, **epoch_values(resumed, 1)},
    ]
    # Values that are what they say: an accuracy counts val images, and an epoch's training
    # loss is the mean of its steps' (every step logged, every batch full: drop_last).
    val_images = len(json.loads((run_dir / "split.json").read_text())["val"])
    for entry in history:
        correct = entry["val_accuracy"] * val_images
        assert correct == pytest.approx(round(correct), abs=1e-4), (entry, val_images)
    for metrics_file in (first, resumed):
        steps = logged(metrics_file, "train/loss_step")
        for epoch, [loss] in logged(metrics_file, "train/loss_epoch").items():
            assert loss == pytest.approx(statistics.fmean(steps[epoch]), rel=1e-6)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["history"] == history
    report = (run_dir / "report.html").read_text()
    assert "<h2>Training curves</h2>" in report
    assert report.count("data:image/png;base64,") >= 3  # confusion, reliability, curves
    assert f"test_resnet on shapes, run {run_dir}: test split" in report


def test_frozen_epochs_run_by_lightning_are_marked_frozen(
    tmp_path: Path, fit_args: list[str]
) -> None:
    run_dir = fit_shapes(tmp_path, fit_args)
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [entry["phase"] for entry in history] == [FROZEN, FINE_TUNE]
    assert all(entry["val_macro_f1"] is not None for entry in history)


def test_dataset_name_of_a_folder_tree(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    assert dataset_name(tmp_path / "photos") == "photos"
    assert dataset_name(f"{tmp_path}/photos/") == "photos"


def test_dataset_name_of_a_label_file_skips_generic_folders(tmp_path: Path) -> None:
    installed = tmp_path / "site-packages" / "elpv_dataset" / "data" / "labels.csv"
    assert dataset_name(installed) == "elpv_dataset (labels.csv)"
    assert dataset_name(tmp_path / "cells" / "Images" / "train.tsv") == "cells (train.tsv)"
    assert dataset_name(tmp_path / "cells" / "labels.csv") == "cells (labels.csv)"
    assert dataset_name("/data/labels.csv") == "labels.csv"  # nothing telling above it


def test_report_title_names_dataset_run_and_split() -> None:
    data = "/venv/lib/python3.11/site-packages/elpv_dataset/data/labels.csv"
    title = report_title(
        model="tf_efficientnet_lite0", data_path=data, run_dir="runs/demo", split="test"
    )
    assert title == "tf_efficientnet_lite0 on elpv_dataset (labels.csv), run runs/demo: test split"
    assert report_title(model="elpv:latest", data_path=data, run_dir=None, split=None) == (
        "elpv:latest on elpv_dataset (labels.csv)"
    )
