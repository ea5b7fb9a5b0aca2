"""Where a run's metrics go: Lightning's CSV logger always (``training.history`` and the
report read its ``metrics.csv``), and beside it the tracker ``--logger`` names.

MLflow is configured as teams already configure it, by its own environment variables
(``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``), so no credential ends up in the
run's config or the artifact's manifest. The MLflow run gets the run's
config as params, Lightning's metrics, the final metrics and the report; its id is kept in
``RUN_DIR/TRACKING_FILE``, which ``--resume`` continues and ``export`` copies into the
manifest.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger

from convtune.models.artifact import (
    CONFIG_FILE,
    LOGS_DIR,
    METRICS_FILE,
    MODEL_DESCRIPTION,
    REPORT_FILE,
    TENSORBOARD_DIR,
    read_tracked_run,
    write_tracked_run,
)
from convtune.training.config import FitConfig

# The module each tracker needs, and the extra that installs it.
_TRACKER_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
_EXTRA = "tracking"
_DEFAULT_EXPERIMENT = "convtune"
_LOGGED_FILES = (REPORT_FILE, METRICS_FILE, MODEL_DESCRIPTION, CONFIG_FILE)


def check_logger_ready(name: str) -> None:
    """Refuse a tracker whose package is missing or, for MLflow, that has nowhere to send
    the run, saying what to install or set."""
    module = _TRACKER_MODULES.get(name)
    if module is not None and importlib.util.find_spec(module) is None:
        raise ValueError(
            f"--logger {name} needs the {module} package: pip install 'convtune[{_EXTRA}]'"
        )
    if name != "mlflow":
        return
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise ValueError(
            "--logger mlflow sends the run to $MLFLOW_TRACKING_URI, which is not set: set it "
            "to your tracking server (http://HOST:5000) or, for a local store, to "
            "file:./mlruns with MLFLOW_ALLOW_FILE_STORE=true"
        )
    allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1")
    if _is_file_store(uri) and not allowed:
        raise ValueError(
            f"MLFLOW_TRACKING_URI={uri} is a file store, which MLflow refuses unless "
            "MLFLOW_ALLOW_FILE_STORE=true is set: set it, or use a tracking server"
        )


def _is_file_store(uri: str) -> bool:
    return urlsplit(uri).scheme in ("", "file")


def build_loggers(config: FitConfig, run_dir: Path, *, resume: bool) -> list[Logger]:
    """The CSV logger (one ``LOGS_DIR/version_N`` per attempt, so resuming never overwrites
    earlier metrics) and ``config.logger``'s tracker, which a resumed run continues."""
    loggers: list[Logger] = [CSVLogger(run_dir, name=LOGS_DIR)]
    if config.logger == "tensorboard":
        loggers.append(TensorBoardLogger(run_dir, name=TENSORBOARD_DIR, default_hp_metric=False))
    elif config.logger == "mlflow":
        earlier = read_tracked_run(run_dir) if resume else None
        loggers.append(
            MLFlowLogger(
                experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", _DEFAULT_EXPERIMENT),
                run_name=run_dir.resolve().name,
                tracking_uri=os.environ["MLFLOW_TRACKING_URI"],  # check_logger_ready saw it
                run_id=earlier["run_id"] if earlier else None,
            )
        )
    return loggers


def start_tracking(loggers: list[Logger], config: FitConfig, run_dir: Path) -> None:
    """Send the run's config to the trackers as params and record the MLflow run's id, at
    the run's first attempt (MLflow keeps a run's params as first logged; the config.yaml
    sent at the end has a resumed run's changes). Called by the main process only: the
    others' trackers write nothing."""
    for logger in loggers[1:]:
        logger.log_hyperparams(config.to_dict())
        if isinstance(logger, MLFlowLogger):
            write_tracked_run(
                run_dir,
                {
                    "logger": "mlflow",
                    "run_id": logger.run_id,
                    "experiment_id": logger.experiment_id,
                    "tracking_uri": without_credentials(logger.experiment.tracking_uri),
                },
            )


def finish_tracking(loggers: list[Logger], run_dir: Path, summary: dict[str, Any]) -> None:
    """Send the final metrics (``best/`` + the summary's keys) and, to MLflow, the report and
    the files that describe the model."""
    final = {
        f"best/{part}/{key}": float(value)
        for part in ("val", "test")
        for key, value in summary.get(part, {}).items()
        if isinstance(value, int | float)
    }
    for logger in loggers[1:]:
        logger.log_metrics(final)
        if isinstance(logger, MLFlowLogger):
            for name in _LOGGED_FILES:
                if (run_dir / name).is_file():
                    logger.experiment.log_artifact(logger.run_id, str(run_dir / name))
        logger.save()


def without_credentials(uri: str) -> str:
    """``uri`` without a user name or password, which a run directory must not keep."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))
