"""Runs tracked where teams look: ``fit --logger mlflow|tensorboard`` beside the CSV log
that the history and the report read, the MLflow run's id carried into the manifest, and
a tracker that cannot work refused before any work."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import fit_refused

from convtune.data.synthetic import make_shapes_dataset
from convtune.models.artifact import (
    LOGS_DIR,
    TENSORBOARD_DIR,
    TRACKING_FILE,
    Manifest,
    read_model_description,
)
from convtune.training.cli import main
from convtune.training.export import build_manifest
from convtune.training.history import read_history

MANIFEST_V1 = Path(__file__).parent / "fixtures" / "manifest-v1.json"


def one_epoch(fit_args: list[str]) -> list[str]:
    """The suite's recipe for one epoch, without test-time views (faster to calibrate)."""
    args = list(fit_args)
    for flag, value in (("--epochs", "1"), ("--tta", "none")):
        args[args.index(flag) + 1] = value
    return args


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Few images: these tests check what is logged, not what is learnt."""
    return make_shapes_dataset(tmp_path_factory.mktemp("small-shapes"), per_class=12, size=40)


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A local MLflow file store, as MLflow's own variables name it."""
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "shapes")
    return uri


@pytest.mark.slow
def test_an_mlflow_run_holds_the_config_metrics_and_report_and_resumes(
    small_shapes: Path, fit_args: list[str], tmp_path: Path, mlflow_store: str
) -> None:
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    fit = ["fit", "--data", str(small_shapes), "--out", str(run_dir), *one_epoch(fit_args)]
    assert main([*fit, "--logger", "mlflow"]) == 0

    record = json.loads((run_dir / TRACKING_FILE).read_text())
    assert record["logger"] == "mlflow" and record["tracking_uri"] == mlflow_store
    client = MlflowClient(mlflow_store)
    run = client.get_run(record["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "shapes"
    assert run.info.run_name == "run"
    params = run.data.params
    assert (params["model"], params["epochs"], params["logger"]) == ("test_resnet", "1", "mlflow")
    val = read_model_description(run_dir).val_metrics
    assert run.data.metrics["best/val/accuracy"] == pytest.approx(val["accuracy"])
    assert "best/test/accuracy" in run.data.metrics
    epochs = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert len(epochs) == 1
    logged = {entry.path for entry in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "metrics.json", "model.json", "config.yaml"} <= logged
    # CSV is still written, and what the history and the report read.
    assert [entry["epoch"] for entry in read_history(run_dir)] == [0]
    assert (run_dir / LOGS_DIR / "version_0" / "metrics.csv").is_file()

    # The manifest records the run; written and read back, it keeps it.
    manifest = build_manifest(run_dir, read_model_description(run_dir))
    assert manifest.tracking == record
    assert Manifest.from_json(manifest.to_json()).tracking == record

    # Resuming continues the same MLflow run: its val history grows by the new epoch.
    assert main(["fit", "--resume", "--out", str(run_dir), "--epochs", "2"]) == 0
    assert json.loads((run_dir / TRACKING_FILE).read_text())["run_id"] == record["run_id"]
    assert len(client.get_metric_history(run.info.run_id, "val/accuracy")) == 2


@pytest.mark.slow
def test_tensorboard_gets_the_metrics_beside_the_csv_log(
    small_shapes: Path, fit_args: list[str], tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    args = ["fit", "--data", str(small_shapes), "--out", str(run_dir), *one_epoch(fit_args)]
    assert main([*args, "--logger", "tensorboard"]) == 0
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR / "version_0")).Reload()
    assert "val/accuracy" in events.Tags()["scalars"]
    assert "best/val/accuracy" in events.Tags()["scalars"]
    assert [entry["epoch"] for entry in read_history(run_dir)] == [0]
    assert not (run_dir / TRACKING_FILE).exists()  # no MLflow run to record


def test_a_manifest_without_tracking_still_loads() -> None:
    manifest = Manifest.from_json(json.loads(MANIFEST_V1.read_text()))
    assert manifest.tracking is None
    assert "tracking" not in manifest.to_json()
    tracked = replace(manifest, tracking={"logger": "mlflow", "run_id": "abc"})
    assert Manifest.from_json(tracked.to_json()).tracking == {"logger": "mlflow", "run_id": "abc"}


def test_a_tracker_whose_package_is_missing_is_refused_with_the_install_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mlflow_store: str, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # importlib finds no mlflow
    error = fit_refused(["--logger", "mlflow"], capsys, tmp_path)
    assert "--logger mlflow needs the mlflow package: pip install 'convtune[tracking]'" in error


def test_mlflow_without_a_tracking_uri_says_what_to_set(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert "$MLFLOW_TRACKING_URI, which is not set" in fit_refused(
        ["--logger", "mlflow"], capsys, tmp_path
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert "MLFLOW_ALLOW_FILE_STORE=true" in fit_refused(["--logger", "mlflow"], capsys, tmp_path)


def test_an_unknown_logger_is_refused_with_the_choices(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    error = fit_refused(["--logger", "wandb"], capsys, tmp_path)
    assert "logger='wandb' (one of csv, tensorboard, mlflow)" in error
