"""Serving benchmark: convtune's service against the in-process ceiling and two peers.

For one artifact and a set of images, in one run on one machine:

1. **ceiling**: the artifact's ONNX graph in this process with onnxruntime, on tensors
   preprocessed beforehand: latency at batch 1 and throughput at each batch size;
2. **service**: ``bentoml serve convtune.service.service:Convtune`` driven over keep-alive
   HTTP on loopback by ``concurrency`` clients (:mod:`convtune.benchmarks.loadgen`):
   requests/s and p50/p95/p99 latency, end to end, decoding and preprocessing included;
3. **peers**: the same load against :mod:`convtune.benchmarks.naive_peer` (FastAPI + PIL +
   torchvision + eager torch on the same weights), what most tutorials ship, and against
   :mod:`convtune.benchmarks.bentoml_peer` (BentoML's batchable image API on the same ONNX
   graph, default settings), what a BentoML user writes from its docs.

Everything runs ``--rounds`` times, interleaved, so that noise on a shared machine hits
them all alike; the table gives the median of the rounds, and each ratio is the median of the
per-round ratios. The goal ratios compare each service load with the batch-1 ceiling
measured right before and right after it, because a shared machine's speed drifts within
minutes. ``--json`` writes every round too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from convtune.benchmarks.common import median_of, write_report
from convtune.benchmarks.loadgen import Files, run_load
from convtune.benchmarks.servers import free_port, running_server
from convtune.data.synthetic import SHAPES, draw_shape
from convtune.models.artifact import locate_artifact
from convtune.models.inference import OnnxClassifier
from convtune.training.export import register_in_store, with_serving_tta

ROOT = Path(__file__).resolve().parents[1]  # the checkout: where `convtune` imports from
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
BENTOML_SERVE = (sys.executable, "-m", "bentoml", "serve")
UVICORN = (sys.executable, "-m", "uvicorn")
GOALS = {  # the performance issue's goals, by ratio name
    "service_vs_ceiling": "service req/s at the highest concurrency ÷ ceiling batch-1 img/s ≥ 0.8",
    "latency_overhead_ms": "service p50 at concurrency 1 − ceiling batch-1 latency ≤ 5 ms",
    "service_vs_naive_peer": "service req/s ÷ naive peer req/s at the highest concurrency ≥ 3",
    "service_vs_bentoml_peer": (
        "service req/s ÷ BentoML peer req/s at the highest concurrency ≥ 1.5"
    ),
    "p50_vs_bentoml_peer": "service p50 ÷ BentoML peer p50 at concurrency 1 < 1",
}
PEER_ARTIFACT_ENV = "CONVTUNE_PEER_ARTIFACT"  # where both peers read the artifact from


@dataclass(frozen=True)
class RunningServer:
    """A server started for the benchmark: the URL of its classifying route, the multipart
    field that route takes the image from, and the pid of its process tree."""

    url: str
    field: str
    pid: int


@dataclass(frozen=True)
class LoadPlan:
    """How each server is driven: every concurrency, for ``duration_s`` after a warm-up."""

    concurrencies: tuple[int, ...]
    duration_s: float
    warmup_s: float


def generated_images(
    count: int, size: int, image_format: str = "PNG", seed: int = 0
) -> list[bytes]:
    """``count`` distinct ``size``×``size`` images of the synthetic shapes, encoded."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        buffer = io.BytesIO()
        draw_shape(SHAPES[index % len(SHAPES)], rng, size).save(buffer, format=image_format)
        images.append(buffer.getvalue())
    return images


def time_calls(call: Callable[[], object], *, min_seconds: float, min_calls: int) -> list[float]:
    """Seconds per call of ``call``, after two untimed warm-up calls."""
    for _ in range(2):
        call()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        call()
        times.append(time.perf_counter() - begin)
    return times


class Ceiling:
    """The artifact's ONNX graph alone in this process, on the uploads preprocessed beforehand."""

    def __init__(self, artifact: Path, uploads: Sequence[bytes]) -> None:
        self.classifier = OnnxClassifier(artifact)
        self.uploads = uploads
        self.pixels = np.stack([self._prepare(data) for data in uploads])

    def _prepare(self, data: bytes) -> np.ndarray:
        return self.classifier.preprocess(self.classifier.decode(data))

    def batch(self, size: int, *, min_seconds: float) -> dict[str, float]:
        """Median latency and images/s of calls on ``size`` images."""
        batch = np.ascontiguousarray(np.resize(self.pixels, (size, *self.pixels.shape[1:])))
        median = statistics.median(
            time_calls(lambda: self.classifier.logits(batch), min_seconds=min_seconds, min_calls=5)
        )
        return {"latency_ms": median * 1000, "images_per_s": size / median}

    def measure(self, *, batch_sizes: Sequence[int], min_seconds: float) -> dict[str, Any]:
        """Every batch size, and what the ceiling leaves out and the service must do for
        each upload: decoding and preprocessing one image (median over the uploads, in turn).
        """
        turn = itertools.cycle(self.uploads)
        decode_times = time_calls(
            lambda: self._prepare(next(turn)), min_seconds=min_seconds, min_calls=len(self.uploads)
        )
        by_batch = {size: self.batch(size, min_seconds=min_seconds) for size in batch_sizes}
        best = max(by_batch, key=lambda size: by_batch[size]["images_per_s"])
        return {
            "decode_preprocess_ms": statistics.median(decode_times) * 1000,
            "batch_1_latency_ms": by_batch[1]["latency_ms"],
            "batch_1_images_per_s": by_batch[1]["images_per_s"],
            "best_batch": best,
            "best_images_per_s": by_batch[best]["images_per_s"],
            "by_batch": by_batch,
        }


def drive(
    server: RunningServer,
    uploads: Sequence[bytes],
    plan: LoadPlan,
    *,
    measure_ceiling: Callable[[], dict[str, float]] | None = None,
) -> dict[int, dict[str, Any]]:
    """Load ``server``'s /predict at each concurrency of ``plan``: the summary of each load.

    ``measure_ceiling`` (the ceiling at batch 1) runs right before and right after each
    load, and the mean of the two goes into its summary as ``ceiling_batch_1``: the goals
    compare the service with the machine as it was during that load, not a minute earlier.
    """
    files = [
        [(server.field, (f"{i}", data, "application/octet-stream"))]
        for i, data in enumerate(uploads)
    ]
    results = {}
    for concurrency in plan.concurrencies:
        # Warm-up: first requests pay for lazy initialisation and connection setup.
        asyncio.run(run_load(server.url, files, concurrency=concurrency, duration_s=plan.warmup_s))
        before = measure_ceiling() if measure_ceiling else None
        summary = measured_load(server, files, concurrency, plan.duration_s)
        if before is not None and measure_ceiling:
            after = measure_ceiling()
            summary["ceiling_batch_1"] = {
                **{key: (before[key] + after[key]) / 2 for key in before},
                "before": before,
                "after": after,
            }
        results[concurrency] = summary
    return results


def measured_load(
    server: RunningServer, files: Sequence[Files], concurrency: int, duration_s: float
) -> dict[str, Any]:
    """One load's loadgen summary, with the CPU time each request cost the server's
    threads and this process, the load generator (``cpu_ms_per_request``)."""
    server_cpu, own_cpu = cpu_seconds(server.pid), time.process_time()
    result = asyncio.run(
        run_load(server.url, files, concurrency=concurrency, duration_s=duration_s)
    )
    own_cpu = time.process_time() - own_cpu
    server_cpu = {key: value - server_cpu[key] for key, value in cpu_seconds(server.pid).items()}
    per_request = 1000 / max(result.requests, 1)
    cpu_ms_per_request = {
        **{key: value * per_request for key, value in server_cpu.items()},
        "server": sum(server_cpu.values()) * per_request,
        "load_generator": own_cpu * per_request,
    }
    return {**result.summary(), "cpu_ms_per_request": cpu_ms_per_request}


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time so far of the process ``pid`` and its children: their main threads (where
    the servers run their event loops) and all their other threads."""
    root = psutil.Process(pid)
    totals = {"server_main_threads": 0.0, "server_other_threads": 0.0}
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            for thread in process.threads():
                kind = "main" if thread.id == process.pid else "other"
                totals[f"server_{kind}_threads"] += thread.user_time + thread.system_time
    return totals


def server_env(extra: Mapping[str, str], source: Path = ROOT) -> dict[str, str]:
    """This environment with ``extra``, ``convtune`` imported from the checkout ``source``."""
    python_path = os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": python_path, **extra}


@dataclass(frozen=True)
class ServerKind:
    """How to start a server (its command, less host and port) and to load it: the path
    that answers 200 once it is ready, its classifying route, and the multipart field that
    route takes the image from."""

    command: tuple[str, ...]
    ready_path: str
    route: str
    field: str


SERVICE = ServerKind(
    (*BENTOML_SERVE, "convtune.service.service:Convtune"), "/readyz", "/predict", "image"
)
# Each peer of `--peers` (benchmarks.cli.SERVE_PEERS); both read the artifact's directory
# from PEER_ARTIFACT_ENV. A round keeps a peer's loads under "NAME_peer".
PEERS = {
    "naive": ServerKind(
        (*UVICORN, "convtune.benchmarks.naive_peer:app", "--log-level=warning"),
        "/ready", "/predict", "image",
    ),
    "bentoml": ServerKind(
        (*BENTOML_SERVE, "convtune.benchmarks.bentoml_peer:ImageClassifier"),
        "/readyz", "/classify", "images",
    ),
}  # fmt: skip
LOADED = ("service", *(f"{name}_peer" for name in PEERS))  # each round's server loads


@contextlib.contextmanager
def local_server(
    name: str, kind: ServerKind, workdir: Path, env: dict[str, str], source: Path = ROOT
) -> Iterator[RunningServer]:
    """``kind`` on a free loopback port, its output in ``workdir/NAME.log``, until the block
    ends, its code from the checkout ``source``. ``env`` is added to the environment, which
    gives the server a BentoML home of its own unless ``env`` names one: ``bentoml serve``
    empties its home's metrics directory when it starts, so servers sharing one would erase
    each other's counts."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with running_server(
        [*kind.command, "--host", "127.0.0.1", "--port", str(port)],
        ready_url=base_url + kind.ready_path,
        log_path=workdir / f"{name}.log",
        env=server_env({"BENTOML_HOME": str(workdir / name), **env}, source),
        cwd=source,
    ) as process:
        yield RunningServer(base_url + kind.route, kind.field, process.pid)


def convtune_service(
    artifact: Path, workdir: Path, service_env: dict[str, str], source: Path = ROOT
) -> contextlib.AbstractContextManager[RunningServer]:
    """``bentoml serve`` of ``artifact`` from a private model store, with the service's code
    from the checkout ``source``."""
    home = workdir / "bentoml"
    tag = register_in_store(artifact, "convtune-bench", bentoml_home=home)
    env = {"BENTOML_HOME": str(home), "CONVTUNE_MODEL": tag, **service_env}
    return local_server("service", SERVICE, workdir, env, source)


def peer_server(
    name: str, artifact: Path, workdir: Path
) -> contextlib.AbstractContextManager[RunningServer]:
    """The peer ``name`` of :data:`PEERS` serving ``artifact``."""
    env = {PEER_ARTIFACT_ENV: str(artifact.resolve())}
    return local_server(f"{name}-peer", PEERS[name], workdir, env)


def round_ratios(one_round: dict[str, Any]) -> dict[str, float]:
    """The goal figures of one round (those whose inputs were measured), each against the
    batch-1 ceiling measured around that load."""
    service = one_round["service"]
    top = max(service)
    ceiling = service[top]["ceiling_batch_1"]
    ratios = {"service_vs_ceiling": service[top]["throughput_rps"] / ceiling["images_per_s"]}
    if 1 in service:
        ceiling = service[1]["ceiling_batch_1"]
        ratios["latency_overhead_ms"] = service[1]["p50_ms"] - ceiling["latency_ms"]
    for name in PEERS:
        if peer := one_round.get(f"{name}_peer"):
            throughput = service[top]["throughput_rps"] / peer[top]["throughput_rps"]
            ratios[f"service_vs_{name}_peer"] = throughput
    if 1 in service and (peer := one_round.get("bentoml_peer")):
        ratios["p50_vs_bentoml_peer"] = service[1]["p50_ms"] / peer[1]["p50_ms"]
    return ratios


def server_errors_where_bentoml_peer_failed(rounds: list[dict[str, Any]]) -> dict[str, int]:
    """5xx of the service and of the BentoML peer, in all rounds, at the loads where the
    peer gave any: the goal wants none from the service there."""
    totals = {"service": 0, "bentoml_peer": 0}
    for one_round in rounds:
        for concurrency, peer in one_round.get("bentoml_peer", {}).items():
            if peer["server_errors"]:
                totals["service"] += one_round["service"][concurrency]["server_errors"]
                totals["bentoml_peer"] += peer["server_errors"]
    return totals


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of every figure the table shows."""
    first = rounds[0]
    load_keys = ("throughput_rps", "p50_ms", "p95_ms", "p99_ms", "server_errors")
    summary: dict[str, Any] = {
        "ceiling": {
            key: median_of(rounds, "ceiling", key)
            for key in (
                "decode_preprocess_ms",
                "batch_1_latency_ms",
                "batch_1_images_per_s",
                "best_images_per_s",
            )
        },
        "ceiling_by_batch": {
            size: median_of(rounds, "ceiling", "by_batch", size, "images_per_s")
            for size in first["ceiling"]["by_batch"]
        },
        "ratios": {key: median_of(rounds, "ratios", key) for key in first["ratios"]},
    }
    if "bentoml_peer" in first:
        summary["server_errors_where_bentoml_peer_failed"] = (
            server_errors_where_bentoml_peer_failed(rounds)
        )
    for server in LOADED:
        if server in first:
            summary[server] = {
                concurrency: {
                    **{key: median_of(rounds, server, concurrency, key) for key in load_keys},
                    "cpu_ms_per_request": {
                        key: median_of(rounds, server, concurrency, "cpu_ms_per_request", key)
                        for key in first[server][concurrency]["cpu_ms_per_request"]
                    },
                }
                for concurrency in first[server]
            }
    summary["ceiling_around_service"] = {
        concurrency: {
            key: median_of(rounds, "service", concurrency, "ceiling_batch_1", key)
            for key in ("latency_ms", "images_per_s")
        }
        for concurrency in first["service"]
    }
    return summary


def format_table(summary: dict[str, Any]) -> str:
    lines = [
        f"{'':<26}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'5xx':>6}{'CPU ms/req':>12}"
    ]
    ceiling = summary["ceiling"]
    lines.append(
        f"{'ceiling, batch 1':<26}{ceiling['batch_1_images_per_s']:>9.1f}"
        f"{ceiling['batch_1_latency_ms']:>9.2f}"
    )
    lines.append(f"{'decode + preprocess':<26}{'':>9}{ceiling['decode_preprocess_ms']:>9.2f}")
    for size, images_per_s in summary["ceiling_by_batch"].items():
        if size != 1:
            lines.append(f"{f'ceiling, batch {size}':<26}{images_per_s:>9.1f}   (img/s)")
    for server in LOADED:
        for concurrency, row in summary.get(server, {}).items():
            name = server.replace("_", " ")
            lines.append(
                f"{f'{name}, {concurrency} clients':<26}{row['throughput_rps']:>9.1f}"
                f"{row['p50_ms']:>9.2f}{row['p95_ms']:>9.2f}{row['p99_ms']:>9.2f}"
                f"{row['server_errors']:>6.0f}{row['cpu_ms_per_request']['server']:>12.2f}"
            )
            if server == "service":
                around = summary["ceiling_around_service"][concurrency]
                lines.append(
                    f"{'  ceiling b1 around it':<26}{around['images_per_s']:>9.1f}"
                    f"{around['latency_ms']:>9.2f}"
                )
    lines.append("")
    for concurrency, row in summary["service"].items():
        cpu = row["cpu_ms_per_request"]
        lines.append(
            f"service CPU per request at {concurrency} clients: "
            f"{cpu['server_main_threads']:.2f} ms in the event loop, "
            f"{cpu['server_other_threads']:.2f} ms in other threads "
            f"(decoding, inference); the load generator {cpu['load_generator']:.2f} ms"
        )
    lines.append("")
    for key, value in summary["ratios"].items():
        lines.append(f"{value:>8.2f}  {GOALS[key]}")
    if errors := summary.get("server_errors_where_bentoml_peer_failed"):
        lines.append(
            f"{errors['service']:>8d}  service 5xx where the BentoML peer gave 5xx "
            f"({errors['bentoml_peer']}), all rounds = 0"
        )
    return "\n".join(lines)


def uploads_for(args: argparse.Namespace) -> list[bytes]:
    """The files of ``--images``, or the generated images the upload arguments describe."""
    if args.images is None:
        return generated_images(args.image_count, args.image_size, args.image_format)
    files = sorted(p for p in args.images.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{args.images} has no files to send")
    return [p.read_bytes() for p in files]


def run(args: argparse.Namespace) -> int:
    """``convtune bench serve`` with the options :mod:`convtune.benchmarks.cli` parsed."""
    concurrencies = tuple(sorted({int(c) for c in args.concurrency.split(",")}))
    if min(concurrencies) < 1 or args.rounds < 1 or args.duration <= 0:
        raise ValueError("--concurrency, --rounds and --duration must be positive")
    artifact = locate_artifact(args.model)
    uploads = uploads_for(args)
    plan = LoadPlan(concurrencies, args.duration, args.warmup)
    service_env = dict(item.split("=", 1) for item in args.service_env)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="convtune-bench-")))
        served_artifact = artifact
        if args.serve_tta is not None:
            served_artifact = with_serving_tta(artifact, workdir / "artifact", tta=args.serve_tta)
        print(f"starting the service and peers: {', '.join(args.peers) or 'none'}", file=sys.stderr)
        service = stack.enter_context(convtune_service(served_artifact, workdir, service_env))
        peers = {
            f"{name}_peer": stack.enter_context(peer_server(name, artifact, workdir))
            for name in args.peers
        }
        ceiling = Ceiling(artifact, uploads)
        rounds = []
        for number in range(1, args.rounds + 1):
            label = f"round {number}/{args.rounds}"
            rounds.append(
                measure_round(label, ceiling, service, peers, uploads, plan, args.ceiling_seconds)
            )
    summary = summarise(rounds)
    print(format_table(summary))
    if args.json:
        write_report(args.json, "serve", vars(args), summary, rounds)
    # A peer's 5xx are a measurement (a goal compares them); the service's are a failure.
    failed = sum(row["server_errors"] for row in summary["service"].values())
    return 1 if failed else 0


def measure_round(
    label: str,
    ceiling: Ceiling,
    service: RunningServer,
    peers: dict[str, RunningServer],
    uploads: Sequence[bytes],
    plan: LoadPlan,
    ceiling_seconds: float,
) -> dict[str, Any]:
    """The ceiling, then the service (the ceiling measured around each load), then each
    peer, its loads under its key in ``peers``."""
    print(f"{label}: ceiling", file=sys.stderr)
    one_round: dict[str, Any] = {
        "ceiling": ceiling.measure(batch_sizes=BATCH_SIZES, min_seconds=ceiling_seconds)
    }
    print(f"{label}: service", file=sys.stderr)
    one_round["service"] = drive(
        service,
        uploads,
        plan,
        measure_ceiling=lambda: ceiling.batch(1, min_seconds=ceiling_seconds),
    )
    for key, peer in peers.items():
        print(f"{label}: {key.replace('_', ' ')}", file=sys.stderr)
        one_round[key] = drive(peer, uploads, plan)
    one_round["ratios"] = round_ratios(one_round)
    return one_round
