"""Does a graph with class maps and stage outputs cost ``predict`` anything?

For each model: the logits-only graph (what export wrote before) and the explained graph
(logits, class maps, stages) of the same weights, both asked for ``logits`` only, at
batch 1 and 32, in alternating rounds; medians and the explained/plain ratio, and the two
files' sizes. Run as ``python -m convtune.benchmarks.explain_outputs [--out FILE]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from convtune.benchmarks.common import median_of, write_report

MODELS = (("test_resnet", 40), ("tf_efficientnet_lite0", 224))
BATCHES = (1, 32)


def export_both(name: str, size: int, folder: Path) -> dict[str, Path]:
    import torch

    from convtune.models.factory import create_model
    from convtune.training.explained_graph import ExplainedClassifier, has_exact_class_maps

    model = create_model(name, 3, pretrained="none", img_size=size).eval()
    example = torch.randn(2, 3, size, size)
    explained = ExplainedClassifier(model, with_class_maps=has_exact_class_maps(model, example))
    paths = {}
    for kind, graph in (("plain", model), ("explained", explained.eval())):
        paths[kind] = folder / f"{name}-{kind}.onnx"
        outputs = len(graph(example)) if kind == "explained" else 1
        torch.onnx.export(
            graph, (example,), str(paths[kind]), input_names=["pixels"],
            output_names=["logits", *(f"extra_{k}" for k in range(1, outputs))],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            dynamo=True, external_data=False, verbose=False,
        )  # fmt: skip
    return paths


def latency(session, pixels: np.ndarray, repeats: int) -> float:
    """Median seconds of one logits-only run."""
    session.run(["logits"], {"pixels": pixels})  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(["logits"], {"pixels": pixels})
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> int:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    rounds: list[dict] = [{} for _ in range(args.rounds)]
    median: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, size in MODELS:
            paths = export_both(name, size, Path(folder))
            sessions = {
                kind: ort.InferenceSession(str(path), options) for kind, path in paths.items()
            }
            for batch in BATCHES:
                pixels = np.random.default_rng(0).standard_normal(
                    (batch, 3, size, size), np.float32
                )
                key = f"{name}/batch{batch}"
                for one_round in rounds:
                    one_round[key] = {
                        kind: latency(session, pixels, args.repeats)
                        for kind, session in sessions.items()
                    }
                plain, explained = (
                    median_of(rounds, key, "plain"),
                    median_of(rounds, key, "explained"),
                )
                median[key] = {
                    "plain_ms": plain * 1e3,
                    "explained_ms": explained * 1e3,
                    "ratio": explained / plain,
                }
                print(
                    f"{key}: plain {plain * 1e3:.2f} ms, explained {explained * 1e3:.2f} ms, "
                    f"ratio {explained / plain:.3f}"
                )
            median[f"{name}/onnx_bytes"] = {
                kind: path.stat().st_size for kind, path in paths.items()
            }
            print(f"{name}: ONNX bytes {median[f'{name}/onnx_bytes']}")
    if args.out is not None:
        write_report(args.out, "explain-outputs", vars(args), median, rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
