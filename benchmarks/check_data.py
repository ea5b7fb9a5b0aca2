"""Data-check benchmark: images/s of ``check_dataset`` against a full decode of each image.

The check reads each file once, hashes it and parses its header and (PNG) chunk structure;
the baseline decodes every image with :func:`~convtune.data.images.decode_rgb`, which is
what a check that trusts only a full decode would cost. Both run over the same files in
the same run, after one untimed read of every file, so that both meet a warm file cache:
the figures are CPU cost, not disk speed. Each round runs the check at every
``--workers`` count and the decode, the order alternating between rounds; the table shows
medians over ``--rounds``, and the ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from convtune.benchmarks.common import machine, median_of, write_report
from convtune.data.checks import check_dataset
from convtune.data.datasets import LabelledImages
from convtune.data.images import IMAGE_SUFFIXES, decode_rgb
from convtune.data.synthetic import draw_shape

GOAL_IMAGES_PER_S = 1000  # the goal for ELPV-sized PNGs on the 2-core machine
ELPV_IMAGES = ("elpv_dataset", "data", "images")  # inside the elpv-dataset package


def elpv_images() -> Path | None:
    """ELPV's images folder, if the elpv-dataset package is installed (not imported)."""
    spec = importlib.util.find_spec(ELPV_IMAGES[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))).joinpath(*ELPV_IMAGES[1:])
    return folder if folder.is_dir() else None


def generate_images(folder: Path, *, count: int, size: int) -> Path:
    """``count`` grayscale PNGs of ``size`` pixels, noisy like ELPV's cells."""
    rng = np.random.default_rng(0)
    for number in range(count):
        image = draw_shape("circle", rng, size).convert("L")
        image.save(folder / f"{number:05d}.png")
    return folder


def list_images(folder: Path) -> LabelledImages:
    """Every image under ``folder``, all of one class: the check's cost is per file."""
    paths = tuple(sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
    if not paths:
        raise ValueError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return LabelledImages(paths, (0,) * len(paths), ("images",))


def images_per_s(work: Callable[[], Any], count: int) -> float:
    started = time.perf_counter()
    work()
    return count / (time.perf_counter() - started)


def decode_all(images: LabelledImages) -> None:
    for path in images.paths:
        decode_rgb(path)


def run_round(images: LabelledImages, workers: list[int], *, decode_first: bool) -> dict:
    """images/s of the check at each worker count and of the full decode, in one order."""
    count = len(images)
    measurements: list[tuple[str, Callable[[], Any]]] = [
        (f"check_{n}_workers", lambda n=n: check_dataset(images, workers=n)) for n in workers
    ]
    decode = ("decode", lambda: decode_all(images))
    measurements = [decode, *measurements] if decode_first else [*measurements, decode]
    one_round = {name: images_per_s(work, count) for name, work in measurements}
    best = max(one_round[f"check_{n}_workers"] for n in workers)
    one_round["check_vs_decode"] = best / one_round["decode"]
    return one_round


def format_table(summary: dict[str, float], workers: list[int], *, count: int, source: str) -> str:
    flags = " ".join(machine()["cpu_flags"]) or "unknown"
    rows = [(f"check_dataset, {n} worker(s)", summary[f"check_{n}_workers"]) for n in workers]
    rows.append(("full decode (decode_rgb), baseline", summary["decode"]))
    best = max(summary[f"check_{n}_workers"] for n in workers)
    return "\n".join(
        [
            f"{count:,} images from {source}; file cache warm; CPU flags: {flags}",
            f"{'':<36}{'images/s':>10}",
            *(f"{label:<36}{value:>10,.0f}" for label, value in rows),
            f"best check ÷ decode: {summary['check_vs_decode']:.1f}×",
            f"goal ≥ {GOAL_IMAGES_PER_S:,} images/s: "
            f"{'met' if best >= GOAL_IMAGES_PER_S else 'NOT met'} ({best:,.0f})",
        ]
    )


def run(args: argparse.Namespace) -> int:
    """``convtune bench check-data`` with the options :mod:`convtune.benchmarks.cli` parsed."""
    workers = [int(n) for n in args.workers.split(",")]
    if min(workers) < 1 or args.rounds < 1:
        raise ValueError("--workers takes counts ≥ 1, comma-separated; --rounds must be ≥ 1")
    with tempfile.TemporaryDirectory(prefix="convtune-bench-check-") as workdir:
        folder = args.images or elpv_images()
        source = str(folder)
        if folder is None:
            folder = generate_images(Path(workdir), count=args.image_count, size=args.image_size)
            source = f"generated {args.image_size}×{args.image_size} grayscale PNGs"
        images = list_images(folder)
        for path in images.paths:  # warm the file cache: measure the CPU, not the disk
            path.read_bytes()
        rounds = []
        for number in range(args.rounds):
            print(f"round {number + 1}/{args.rounds}", file=sys.stderr)
            rounds.append(run_round(images, workers, decode_first=number % 2 == 1))
    summary = {name: median_of(rounds, name) for name in rounds[0]}
    summary["check_vs_decode"] = statistics.median(r["check_vs_decode"] for r in rounds)
    print(format_table(summary, workers, count=len(images), source=source))
    if args.json:
        write_report(args.json, "check-data", vars(args), summary, rounds)
    return 0
