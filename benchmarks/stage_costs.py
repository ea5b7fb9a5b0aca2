"""CPU time per image of the stages the service runs on an upload, in one process: decoding,
preprocessing, and the model's call at batch 1 on one onnxruntime thread.

``convtune bench paired`` runs this file as a script, with a side's source tree first on
``PYTHONPATH``, so that each side's figures come from its own code::

    python benchmarks/stage_costs.py ARTIFACT IMAGE_FOLDER [SECONDS]

prints one JSON object: milliseconds of CPU per call, the median over calls on each image
in turn, for at least SECONDS per stage [1].
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def median_cpu_ms(call: Callable[[Any], object], items: Sequence[Any], min_seconds: float) -> float:
    """Median CPU milliseconds (every thread of this process) of ``call`` on each of
    ``items`` in turn, after one untimed pass over them."""
    for item in items:
        call(item)
    times = []
    started = time.perf_counter()
    for item in itertools.cycle(items):
        if len(times) >= len(items) and time.perf_counter() - started >= min_seconds:
            break
        begin = time.process_time()
        call(item)
        times.append(time.process_time() - begin)
    return statistics.median(times) * 1000


def stage_costs(artifact: Path, uploads: Sequence[bytes], *, min_seconds: float) -> dict:
    """CPU ms per image of decoding, preprocessing and the model alone (one thread)."""
    from convtune.models.inference import OnnxClassifier

    classifier = OnnxClassifier(artifact, threads=1)
    images = [classifier.decode(data) for data in uploads]
    pixels = [classifier.preprocess(rgb)[np.newaxis] for rgb in images]
    return {
        "decode": median_cpu_ms(classifier.decode, uploads, min_seconds),
        "preprocess": median_cpu_ms(classifier.preprocess, images, min_seconds),
        "model_one_thread": median_cpu_ms(classifier.logits, pixels, min_seconds),
    }


def main(argv: Sequence[str]) -> int:
    artifact, folder, *rest = argv
    uploads = [path.read_bytes() for path in sorted(Path(folder).iterdir())]
    min_seconds = float(rest[0]) if rest else 1.0
    print(json.dumps(stage_costs(Path(artifact), uploads, min_seconds=min_seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
