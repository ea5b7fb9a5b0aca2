"""What every benchmark shares: installed versions, medians over rounds, the JSON report.

A report carries the machine and the package versions it ran on, because a figure means
nothing without them; rounds are summarised by medians, which one noisy round cannot move.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from convtune.models.artifact import INPUT_NAME, OUTPUT_NAME, installed_version

REPORTED_PACKAGES = (
    "torch", "lightning", "timm", "onnxruntime", "bentoml", "fastapi", "numpy", "pillow",
)  # fmt: skip

# Vector-instruction sets that decide how fast numeric code runs, as /proc/cpuinfo names them.
SIMD_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni",
    "avx512_bf16", "amx_tile", "amx_bf16",
)  # fmt: skip


def missing_distributions(distributions: Iterable[str]) -> list[str]:
    return [name for name in distributions if installed_version(name) is None]


def machine() -> dict[str, Any]:
    versions = {name: installed_version(name) for name in REPORTED_PACKAGES}
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "cpu_flags": cpu_flags(),
        "python": platform.python_version(),
        "versions": {name: version for name, version in versions.items() if version},
    }


def cpu_flags() -> list[str]:
    """Which of :data:`SIMD_FLAGS` this CPU has (Linux; none known elsewhere)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), ":")
    present = set(line.split(":", 1)[1].split())
    return [flag for flag in SIMD_FLAGS if flag in present]


def logits_latency(session: Any, pixels: Any, repeats: int) -> float:
    """Median seconds of one onnxruntime ``session`` run of the logits on ``pixels``, after
    one unmeasured warm-up run."""
    feed = {INPUT_NAME: pixels}
    session.run([OUTPUT_NAME], feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run([OUTPUT_NAME], feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
