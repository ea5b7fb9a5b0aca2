"""Why the service has inference lanes: onnxruntime next to a decoding thread, in-process.

For one artifact: images/s of one session spread over every core, against one
single-threaded session per core run side by side (the service's lanes), each alone and
then with ``--decoders`` threads decoding the uploads non-stop beside them, as a loaded
service does. A call spread over all cores waits at each of its parallel sections for its
slowest thread, so it loses far more to a decode than the decode's share of the CPU; the
single-threaded sessions lose only that share. Last, the service's work without its HTTP
side: as many threads as the service has lanes, each decoding, preprocessing and inferring
one upload after another on a single-threaded session of its own; its images/s against the
one all-core session alone (the serving benchmark's batch-1 ceiling) bounds what any HTTP
front end could reach. Rounds alternate the order; the table gives medians over
``--rounds``. Run as ``convtune bench lanes`` or
``python -m benchmarks.lanes``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convtune.benchmarks.common import write_report
from convtune.benchmarks.serve import generated_images
from convtune.service.batching import lane_layout

ALL_CORES = "one session, every core"  # the serving benchmark's batch-1 ceiling
SERVICE_WORK = "service work, no HTTP"


def run_side_by_side(
    calls: Sequence[Callable[[], int]],
    *,
    decode: Callable[[], object],
    decoders: int,
    seconds: float,
) -> dict[str, float]:
    """Each of ``calls`` (returning images done) in a loop on its own thread, ``decoders``
    threads calling ``decode`` meanwhile; images/s of the calls and decodes/s."""
    stop = time.perf_counter() + seconds
    images = [0] * len(calls)
    decodes = [0] * decoders

    def infer_loop(index: int) -> None:
        while time.perf_counter() < stop:
            images[index] += calls[index]()

    def decode_loop(index: int) -> None:
        while time.perf_counter() < stop:
            decode()
            decodes[index] += 1

    threads = [threading.Thread(target=infer_loop, args=(i,)) for i in range(len(calls))]
    threads += [threading.Thread(target=decode_loop, args=(i,)) for i in range(decoders)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {"images_per_s": sum(images) / elapsed, "decodes_per_s": sum(decodes) / elapsed}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convtune bench lanes",
        description="onnxruntime throughput next to decoding threads: one session over every "
        "core against one single-threaded session per core.",
    )
    parser.add_argument(
        "model", metavar="MODEL", help="artifact directory or NAME[:VERSION] in the BentoML store"
    )
    parser.add_argument("--batch", type=int, default=1, help="images per call [1]")
    parser.add_argument("--decoders", type=int, default=1, help="decoding threads [1]")
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement [4]")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions, medians taken [3]")
    parser.add_argument("--image-size", type=int, default=300, help="generated PNG size [300]")
    parser.add_argument("--json", type=Path, help="write the rounds and medians here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.batch, args.decoders, args.rounds) < 1 or args.seconds <= 0:
        raise ValueError("--batch, --decoders, --rounds and --seconds must be positive")
    from convtune.models.inference import OnnxClassifier
    from convtune.training.export import locate_artifact

    cores = os.cpu_count() or 1
    classifier = OnnxClassifier(locate_artifact(args.model))
    uploads = generated_images(8, args.image_size)
    pixels = np.stack([classifier.preprocess(classifier.decode(data)) for data in uploads])
    batch = np.ascontiguousarray(np.resize(pixels, (args.batch, *pixels.shape[1:])))
    turn = itertools.cycle(uploads)
    setups = {
        ALL_CORES: [classifier.probabilities],
        f"{cores} sessions, 1 thread each": [classifier.lane(threads=1) for _ in range(cores)],
    }

    def serve_uploads(session: Callable[[np.ndarray], np.ndarray]) -> Callable[[], int]:
        in_turn = itertools.cycle(uploads)
        return lambda: len(session(classifier.preprocess(classifier.decode(next(in_turn)))[None]))

    lanes = max(lane_layout(cores)[0], 1)
    service_work = [serve_uploads(classifier.lane(threads=1)) for _ in range(lanes)]
    rounds: list[dict[str, Any]] = []
    for number in range(args.rounds):
        print(f"round {number + 1}/{args.rounds}", file=sys.stderr)
        one_round: dict[str, Any] = {}
        for name in list(setups) if number % 2 == 0 else list(setups)[::-1]:
            calls = [lambda f=f: len(f(batch)) for f in setups[name]]
            for call in calls:
                call()  # warm-up
            one_round[name] = {
                str(decoders): run_side_by_side(
                    calls,
                    decode=lambda: classifier.decode(next(turn)),
                    decoders=decoders,
                    seconds=args.seconds,
                )
                for decoders in (0, args.decoders)
            }
        work = run_side_by_side(service_work, decode=lambda: None, decoders=0, seconds=args.seconds)
        one_round[SERVICE_WORK] = {
            **work,
            "vs_ceiling": work["images_per_s"] / one_round[ALL_CORES]["0"]["images_per_s"],
        }
        rounds.append(one_round)
    median = median_over(rounds)
    print(format_table(median, decoders=args.decoders, lanes=lanes))
    if args.json:
        write_report(args.json, "lanes", vars(args), median, rounds)
    return 0


def median_over(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The same nested dict as one round, each number the median over ``rounds``."""

    def median_of(values: list[Any]) -> Any:
        if isinstance(values[0], dict):
            return {key: median_of([value[key] for value in values]) for key in values[0]}
        return statistics.median(values)

    return median_of(rounds)


def format_table(median: dict[str, Any], *, decoders: int, lanes: int) -> str:
    lines = [f"{'':<32}{'alone img/s':>12}{'beside decoding':>17}{'decodes/s':>11}"]
    for name, loads in median.items():
        if name != SERVICE_WORK:
            alone, beside = loads["0"], loads[str(decoders)]
            lines.append(
                f"{name:<32}{alone['images_per_s']:>12.1f}{beside['images_per_s']:>17.1f}"
                f"{beside['decodes_per_s']:>11.0f}"
            )
    work = median[SERVICE_WORK]
    lines.append(
        f"\ndecode + preprocess + infer on {lanes} single-threaded sessions (the service's work "
        f"without HTTP): {work['images_per_s']:.1f} img/s, {work['vs_ceiling']:.2f} x the "
        "all-core session alone"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
