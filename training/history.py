"""A run's training history: one entry per epoch, the frozen phase marked.

Lightning writes ``LOGS_DIR/version_N/LOG_METRICS_FILE`` (a new version per attempt, so ``--resume``
adds one); with ``--cache-features`` the frozen epochs run as a linear probe outside
Lightning, whose history ``fit`` saves as ``PROBE_HISTORY_FILE``. ``read_history`` puts the
two together in epoch order.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from convtune.models.artifact import LOG_METRICS_FILE, LOGS_DIR, PROBE_HISTORY_FILE
from convtune.training.config import load_saved_config

FROZEN, FINE_TUNE = "frozen", "fine-tune"
# Lightning's column for each history key; the probe records all but val_macro_f1.
_CSV_COLUMNS = {
    "train_loss": "train/loss_epoch",
    "val_loss": "val/loss",
    "val_accuracy": "val/accuracy",
    "val_macro_f1": "val/macro_f1",
}


def write_probe_history(run_dir: Path, epochs: list[dict[str, float]]) -> None:
    (run_dir / PROBE_HISTORY_FILE).write_text(json.dumps(epochs, indent=1) + "\n")


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """Per-epoch ``epoch`` (from 0), ``phase`` (``FROZEN`` or ``FINE_TUNE``) and the
    ``_CSV_COLUMNS`` keys (None where an epoch did not record one)."""
    probe_file = run_dir / PROBE_HISTORY_FILE
    probe = json.loads(probe_file.read_text()) if probe_file.is_file() else []
    epochs = dict(enumerate(probe))
    # After a probe, Lightning counts its epochs from 0 again.
    for number, values in _lightning_epochs(run_dir / LOGS_DIR).items():
        epochs[len(probe) + number] = values
    freeze_epochs = load_saved_config(run_dir).freeze_epochs
    return [
        {
            "epoch": number,
            "phase": FROZEN if number < freeze_epochs else FINE_TUNE,
            **{key: epochs[number].get(key) for key in _CSV_COLUMNS},
        }
        for number in sorted(epochs)
    ]


def _lightning_epochs(logs_dir: Path) -> dict[int, dict[str, float]]:
    """The values logged per epoch, over every attempt in order: where attempts overlap
    (resuming repeats an epoch that was cut short), the later attempt's values win."""
    epochs: dict[int, dict[str, float]] = {}
    for metrics_file in _metrics_files(logs_dir):
        with metrics_file.open(newline="") as stream:
            for row in csv.DictReader(stream):
                if not row.get("epoch"):
                    continue
                values = epochs.setdefault(int(float(row["epoch"])), {})
                for key, column in _CSV_COLUMNS.items():
                    if row.get(column):
                        values[key] = float(row[column])
    # An epoch cut short before logging any epoch-level value is no epoch of the history.
    return {number: values for number, values in epochs.items() if values}


def _metrics_files(logs_dir: Path) -> list[Path]:
    """``version_N/LOG_METRICS_FILE`` in attempt order (numerically: version_10 after
    version_9)."""
    numbers = [d.name.removeprefix("version_") for d in logs_dir.glob("version_*")]
    files = [logs_dir / f"version_{n}" / LOG_METRICS_FILE for n in sorted(numbers, key=int)]
    return [f for f in files if f.is_file()]
