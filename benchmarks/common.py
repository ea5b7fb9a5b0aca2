"""What every benchmark report carries: the machine, the date, medians over rounds."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

_VERSIONED = ("torch", "lightning", "timm", "onnxruntime", "bentoml", "fastapi", "numpy", "pillow")


def machine() -> dict[str, Any]:
    versions = {}
    for package in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "versions": versions,
    }


def median_of(rounds: list[dict[str, Any]], *keys: Any) -> float:
    """The median over ``rounds`` of ``round[keys[0]][keys[1]]...``."""
    values = []
    for one_round in rounds:
        value: Any = one_round
        for key in keys:
            value = value[key]
        values.append(value)
    return statistics.median(values)


def write_report(
    path: Path, benchmark: str, arguments: dict[str, Any], median: dict, rounds: list
) -> None:
    report = {
        "benchmark": benchmark,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "arguments": {key: str(value) for key, value in arguments.items()},
        "median": median,
        "rounds": rounds,
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
