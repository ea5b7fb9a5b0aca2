"""``convtune predict`` benchmark: end-to-end throughput against the in-process ceiling,
cold start, and peak memory as the number of images grows.

For one artifact and a folder of PNGs, in one run on one machine:

1. **ceiling**: in this process, no CLI: decode, preprocess and ``OnnxClassifier``
   probabilities, one batch after the other, at each batch size; the best one counts;
2. **predict**: ``python -m convtune predict ARTIFACT FOLDER --format jsonl --output FILE``
   in a fresh process, timed from start to exit (start-up, listing and writing included);
3. **cold start**: ``convtune predict ARTIFACT one.png``, a fresh process each time;
4. **memory**: the peak RSS of ``convtune predict`` over each count of images (hard links
   to the same PNGs, listed in a label file, so that larger counts cost no disk).

Ceiling and predict alternate ``--rounds`` times, so noise on a shared machine hits both
alike; each round's ratio compares predict with the best ceiling measured right before and
right after it; the table gives medians, and the ratio is the median of the per-round
ratios.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convtune.benchmarks.common import cpu_flags, median_of, write_report
from convtune.data.synthetic import SHAPES, draw_shape
from convtune.models.artifact import locate_artifact
from convtune.models.inference import OnnxClassifier
from convtune.training.predict import collect_inputs

ROOT = Path(__file__).resolve().parents[1]  # the checkout: where `convtune` imports from
GOALS = {
    "predict_vs_ceiling": "predict img/s ÷ best in-process ceiling img/s ≥ 0.8",
    "cold_start_s": "convtune predict ARTIFACT one.png, wall seconds ≤ 1.5",
}


def write_pngs(folder: Path, *, count: int, size: int, seed: int = 0) -> list[Path]:
    """``count`` distinct ``size``×``size`` PNGs of the synthetic shapes in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"{index:05d}.png" for index in range(count)]
    for index, path in enumerate(paths):
        draw_shape(SHAPES[index % len(SHAPES)], rng, size).save(path)
    return paths


def linked_list(images: Sequence[Path], *, count: int, folder: Path) -> Path:
    """A label file of ``count`` distinct paths, hard links cycling over ``images`` (copies
    where the file system has no hard links)."""
    folder.mkdir(parents=True, exist_ok=True)
    label_file = folder / "images.csv"
    with label_file.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path"])
        for index in range(count):
            link = folder / f"{index:05d}.png"
            source = images[index % len(images)]
            try:
                os.link(source, link)
            except OSError:
                link.write_bytes(source.read_bytes())
            writer.writerow([link.name])
    return label_file


def ceiling(classifier: OnnxClassifier, images: Sequence[Path], batch_size: int) -> float:
    """Images/s of decoding, preprocessing and classifying ``images`` in ``batch_size``
    batches, one step after the other in this process."""
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        classifier.probabilities(
            np.stack([classifier.preprocess(classifier.decode(path)) for path in batch])
        )
    return len(images) / (time.perf_counter() - started)


def run_predict(arguments: Sequence[str]) -> dict[str, float]:
    """``python -m convtune predict ARGUMENTS`` in a fresh process: its wall seconds and
    peak RSS (MiB); its failure, with its stderr, as an error."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "convtune", "predict", *arguments],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stderr = process.stderr.read() if process.stderr else ""
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"convtune predict exited with {process.returncode}: {stderr.strip()}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}  # Linux: KiB


def one_round(
    classifier: OnnxClassifier, artifact: Path, images: Sequence[Path], *, folder: Path,
    batch_sizes: Sequence[int], output: Path,
) -> dict[str, Any]:  # fmt: skip
    """Every batch size's ceiling, then predict, then the best batch size's ceiling again:
    the ratio takes the mean of the best ceiling right before and right after predict,
    because a shared machine's speed drifts within minutes."""
    ceilings = {size: ceiling(classifier, images, size) for size in batch_sizes}
    best = max(ceilings, key=ceilings.__getitem__)
    predicted = run_predict(
        [str(artifact), str(folder), "--format", "jsonl", "--output", str(output)]
    )
    best_after = ceiling(classifier, images, best)
    predict_rate = len(images) / predicted["seconds"]
    return {
        "ceiling_images_per_s": {str(size): rate for size, rate in ceilings.items()},
        "best_batch_size": best,
        "best_ceiling_after_images_per_s": best_after,
        "predict_images_per_s": predict_rate,
        "predict_vs_ceiling": predict_rate / statistics.mean([ceilings[best], best_after]),
    }


def memory(
    artifact: Path, images: Sequence[Path], *, counts: Sequence[int], workdir: Path
) -> dict[str, float]:
    """Peak RSS (MiB) of ``convtune predict`` over each count of images."""
    peaks = {}
    for count in counts:
        label_file = linked_list(images, count=count, folder=workdir / f"linked-{count}")
        result = run_predict(
            [
                str(artifact),
                str(label_file),
                "--format",
                "jsonl",
                "--output",
                str(workdir / "memory.jsonl"),
            ]
        )
        peaks[str(count)] = result["peak_rss_mib"]
        seconds, peak = result["seconds"], result["peak_rss_mib"]
        print(f"  {count} images: {seconds:.1f} s, peak RSS {peak:.0f} MiB", file=sys.stderr)
    return peaks


def format_table(summary: dict[str, Any], image_count: int) -> str:
    lines = [
        f"{'ceiling, batch ' + size + ' (img/s)':<44}{rate:>10.1f}"
        for size, rate in summary["ceiling_images_per_s"].items()
    ]
    predict_name = f"convtune predict, {image_count} PNGs (img/s)"
    lines.append(f"{predict_name:<44}{summary['predict_images_per_s']:>10.1f}")
    lines += [
        f"{f'peak RSS, {count} images (MiB)':<44}{peak:>10.0f}"
        for count, peak in summary["peak_rss_mib"].items()
    ]
    lines += ["", f"{summary['predict_vs_ceiling']:>8.2f}  {GOALS['predict_vs_ceiling']}"]
    lines.append(f"{summary['cold_start_s']:>8.2f}  {GOALS['cold_start_s']}")
    return "\n".join(lines)


def summarise(
    rounds: list[dict[str, Any]], *, cold_starts: list[float], peaks: dict[str, float]
) -> dict[str, Any]:
    sizes = rounds[0]["ceiling_images_per_s"]
    return {
        "ceiling_images_per_s": {
            size: median_of(rounds, "ceiling_images_per_s", size) for size in sizes
        },
        "predict_images_per_s": median_of(rounds, "predict_images_per_s"),
        "predict_vs_ceiling": median_of(rounds, "predict_vs_ceiling"),
        "cold_start_s": statistics.median(cold_starts),
        "peak_rss_mib": peaks,
        "cpu_flags": cpu_flags(),
    }


def run(args: argparse.Namespace) -> int:
    """``convtune bench predict`` with the options :mod:`convtune.benchmarks.cli` parsed."""
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    counts = [int(count) for count in args.rss_counts.split(",") if count]
    if min(args.rounds, args.cold_starts, args.image_count, *batch_sizes) < 1:
        raise ValueError("--rounds, --cold-starts, --image-count and --batch-sizes must be ≥ 1")
    artifact = locate_artifact(args.model)
    classifier = OnnxClassifier(artifact)
    with tempfile.TemporaryDirectory(prefix="convtune-bench-predict-") as workdir_name:
        workdir = Path(workdir_name)
        folder = args.images or workdir / "images"
        if args.images is None:
            write_pngs(folder, count=args.image_count, size=args.image_size)
        images = [image.path for image in collect_inputs([folder], classes=())]
        rounds = []
        for number in range(args.rounds):
            print(f"round {number + 1}/{args.rounds}", file=sys.stderr)
            rounds.append(
                one_round(
                    classifier,
                    artifact,
                    images,
                    folder=folder,
                    batch_sizes=batch_sizes,
                    output=workdir / "predict.jsonl",
                )
            )
        cold_starts = [
            run_predict([str(artifact), str(images[0])])["seconds"] for _ in range(args.cold_starts)
        ]
        print("memory", file=sys.stderr)
        peaks = memory(artifact, images, counts=counts, workdir=workdir)
    summary = summarise(rounds, cold_starts=cold_starts, peaks=peaks)
    print(format_table(summary, len(images)))
    print(f"cpu flags: {' '.join(summary['cpu_flags']) or 'unknown'}")
    if args.json:
        write_report(args.json, "predict", vars(args), summary, rounds)
    return 0
