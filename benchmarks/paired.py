"""``convtune bench paired``: is B faster than A, and where does each request's CPU go?

A change worth a millisecond per request is smaller than the drift of a shared machine's
speed between two runs of ``bench serve``. So both services run at once and are loaded in
turn with short loads, the order swapped every other pair, and each verdict is the median
of per-pair ratios, with how many pairs went B's way. The sides differ by artifact
(``--b-model``: an int8 export against its float one), by code (``--a-ref``: this
checkout at a git revision, against the working tree) or by environment (``--a-env``).

Each side's CPU per request is split into stages. Measured over the loads: the client (the
load generator, this process), the event loop (the server's main thread: HTTP, multipart
parsing, the header check, the JSON answer) and the server's other threads. Measured in a
process of the side's own code (``benchmarks/stage_costs.py``, once before the loads and
once after): decoding and preprocessing. Inference is the other threads' time less those
two: the model's call with onnxruntime's threads, their spinning, and the hand-offs between
threads; the model alone on one thread is shown beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convtune.benchmarks.common import write_report
from convtune.benchmarks.serve import (
    ROOT,
    LoadPlan,
    convtune_service,
    drive,
    server_env,
    uploads_for,
)
from convtune.models.artifact import locate_artifact

SIDES = ("a", "b")
STAGE_COSTS_SCRIPT = Path(__file__).with_name("stage_costs.py")
# A request's CPU, by stage, in the order a request meets them (see the module docstring).
STAGES = ("client", "event_loop", "decode", "preprocess", "inference")


@dataclass(frozen=True)
class Side:
    """One of the two services: its artifact, the checkout its code comes from, and the
    environment it runs with."""

    artifact: Path
    source: Path
    env: dict[str, str] = field(default_factory=dict)
    revision: str | None = None

    def describe(self) -> str:
        code = f"code at {self.revision}" if self.revision else "the working tree"
        settings = " ".join(f"{key}={value}" for key, value in self.env.items())
        return ", ".join(filter(None, [str(self.artifact), code, settings]))


def checkout_at(revision: str, folder: Path) -> Path:
    """This checkout's tracked files at ``revision``, written into ``folder``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise ValueError(f"cannot check out {revision!r}: {archive.stderr.decode().strip()}")
    folder.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def stage_costs(side: Side, image_folder: Path, seconds: float) -> dict[str, float]:
    """CPU ms per image of decoding, preprocessing and the model alone, by ``side``'s code."""
    done = subprocess.run(
        [sys.executable, str(STAGE_COSTS_SCRIPT), str(side.artifact), str(image_folder),
         str(seconds)],
        env=server_env(side.env, side.source),
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"timing the stages failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.splitlines()[-1])


def cpu_split(load: dict[str, Any], stages: dict[str, float]) -> dict[str, float]:
    """One load's CPU ms per request by stage (:data:`STAGES`), its server total, and the
    model alone on one thread, for single-image requests."""
    cpu = load["cpu_ms_per_request"]
    decode, preprocess = stages["decode"], stages["preprocess"]
    return {
        "client": cpu["load_generator"],
        "event_loop": cpu["server_main_threads"],
        "decode": decode,
        "preprocess": preprocess,
        "inference": cpu["server_other_threads"] - decode - preprocess,
        "server": cpu["server"],
        "model_one_thread": stages["model_one_thread"],
    }


def side_summary(loads: list[dict[str, Any]], stages: dict[str, float]) -> dict[str, Any]:
    """Medians over one side's loads (one per pair) and of their CPU split."""
    return {
        **{
            key: statistics.median(load[key] for load in loads)
            for key in ("throughput_rps", "p50_ms", "p95_ms")
        },
        "server_errors": sum(load["server_errors"] for load in loads),
        "cpu_ms_per_request": {
            key: statistics.median(cpu_split(load, stages)[key] for load in loads)
            for key in (*STAGES, "server", "model_one_thread")
        },
    }


def compare(pairs: list[dict[str, Any]], stages: dict[str, dict[str, float]]) -> dict:
    """For each concurrency: each side's summary, and the per-pair verdicts of B against A."""
    result = {}
    for concurrency in pairs[0]["a"]:
        a = [pair["a"][concurrency] for pair in pairs]
        b = [pair["b"][concurrency] for pair in pairs]
        throughput = [y["throughput_rps"] / x["throughput_rps"] for x, y in zip(a, b, strict=True)]
        p50 = [y["p50_ms"] - x["p50_ms"] for x, y in zip(a, b, strict=True)]
        server_cpu = [
            y["cpu_ms_per_request"]["server"] / x["cpu_ms_per_request"]["server"]
            for x, y in zip(a, b, strict=True)
        ]
        result[concurrency] = {
            "a": side_summary(a, stages["a"]),
            "b": side_summary(b, stages["b"]),
            "throughput_ratio": statistics.median(throughput),
            "pairs_b_higher_throughput": sum(ratio > 1 for ratio in throughput),
            "p50_diff_ms": statistics.median(p50),
            "pairs_b_lower_p50": sum(diff < 0 for diff in p50),
            "server_cpu_ratio": statistics.median(server_cpu),
            "pairs_b_less_server_cpu": sum(ratio < 1 for ratio in server_cpu),
            "pairs": len(pairs),
        }
    return result


def format_table(result: dict[int, dict[str, Any]], sides: dict[str, Side]) -> str:
    lines = [f"{side.upper()}: {sides[side].describe()}" for side in SIDES]
    for concurrency, row in result.items():
        a, b = row["a"], row["b"]
        n = row["pairs"]
        lines += [
            "",
            f"{concurrency} client{'s' if concurrency > 1 else ''}{'':<14}{'A':>9}{'B':>9}",
            f"{'req/s':<24}{a['throughput_rps']:>9.1f}{b['throughput_rps']:>9.1f}"
            f"   B/A {row['throughput_ratio']:.3f} (B higher in "
            f"{row['pairs_b_higher_throughput']} of {n} pairs)",
            f"{'p50 ms':<24}{a['p50_ms']:>9.2f}{b['p50_ms']:>9.2f}"
            f"   B-A {row['p50_diff_ms']:+.2f} ms (B lower in {row['pairs_b_lower_p50']} of {n})",
            f"{'p95 ms':<24}{a['p95_ms']:>9.2f}{b['p95_ms']:>9.2f}",
            "CPU ms per request:",
        ]
        for key in (*STAGES, "server", "model_one_thread"):
            name = {"server": "server, all", "model_one_thread": "(model alone, 1 thread)"}
            lines.append(
                f"{'  ' + name.get(key, key.replace('_', ' ')):<24}"
                f"{a['cpu_ms_per_request'][key]:>9.2f}{b['cpu_ms_per_request'][key]:>9.2f}"
                + (
                    f"   B/A {row['server_cpu_ratio']:.3f} (B less in "
                    f"{row['pairs_b_less_server_cpu']} of {n})"
                    if key == "server"
                    else ""
                )
            )
    return "\n".join(lines)


def sides_from(args: argparse.Namespace, workdir: Path) -> dict[str, Side]:
    artifacts = {"a": locate_artifact(args.model), "b": locate_artifact(args.b_model or args.model)}
    sides = {}
    for side in SIDES:
        revision = getattr(args, f"{side}_ref")
        source = checkout_at(revision, workdir / f"{side}-source") if revision else ROOT
        env = dict(item.split("=", 1) for item in getattr(args, f"{side}_env"))
        sides[side] = Side(artifacts[side], source, env, revision)
    return sides


def measured_stages(
    sides: dict[str, Side], image_folder: Path, seconds: float
) -> dict[str, dict[str, float]]:
    """Each side's stage costs, timed A, B, B, A: the mean of its two timings."""
    timings: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    for side in (*SIDES, *reversed(SIDES)):
        timings[side].append(stage_costs(sides[side], image_folder, seconds))
    return {
        side: {key: statistics.fmean(t[key] for t in timings[side]) for key in timings[side][0]}
        for side in SIDES
    }


def run(args: argparse.Namespace) -> int:
    """``convtune bench paired`` with the options :mod:`convtune.benchmarks.cli` parsed."""
    concurrencies = tuple(sorted({int(c) for c in args.concurrency.split(",")}))
    if min(concurrencies) < 1 or args.pairs < 1 or args.duration <= 0:
        raise ValueError("--concurrency, --pairs and --duration must be positive")
    uploads = uploads_for(args)
    plan = LoadPlan(concurrencies, args.duration, args.warmup)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="convtune-ab-")))
        sides = sides_from(args, workdir)
        if sides["a"] == sides["b"]:
            print("note: A and B are the same: this run shows the noise", file=sys.stderr)
        image_folder = workdir / "uploads"
        image_folder.mkdir()
        for index, data in enumerate(uploads):
            (image_folder / f"{index:05d}").write_bytes(data)
        print("timing the stages in-process", file=sys.stderr)
        stages = measured_stages(sides, image_folder, args.stage_seconds)
        servers = {}
        for side, spec in sides.items():
            folder = workdir / f"{side}-service"
            folder.mkdir()
            servers[side] = stack.enter_context(
                convtune_service(spec.artifact, folder, spec.env, spec.source)
            )
        pairs = []
        for number in range(args.pairs):
            order = SIDES if number % 2 == 0 else SIDES[::-1]
            label = f"pair {number + 1}/{args.pairs}: {' then '.join(order).upper()}"
            print(label, file=sys.stderr)
            pairs.append({side: drive(servers[side], uploads, plan) for side in order})
    result = compare(pairs, stages)
    print(format_table(result, sides))
    if args.json:
        arguments = {**vars(args), **{f"{side}_side": sides[side].describe() for side in SIDES}}
        median = {"stages": stages, "loads": result}
        write_report(args.json, "paired", arguments, median, pairs)
    failed = sum(row[side]["server_errors"] for row in result.values() for side in SIDES)
    return 1 if failed else 0
