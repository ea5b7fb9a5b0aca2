"""Does explaining cost ``predict`` anything?

For each model, three graphs of the same weights, each asked for ``logits`` only: the
model exported alone (``plain``, what export wrote before explaining), the artifact's
``model.onnx`` (``logits``, cut from the explaining graph) and its ``explain.onnx``
(``explained``: logits, class maps, stages), at batch 1 and 32 in alternating rounds;
medians, the ratios to ``plain`` and the files' sizes. Run as
``python -m convtune.benchmarks.explain_outputs [--out FILE]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from convtune.benchmarks.common import logits_latency, median_of, write_report

MODELS = (("test_resnet", 40), ("tf_efficientnet_lite0", 224))
BATCHES = (1, 32)
KINDS = ("plain", "logits", "explained")


def export_graphs(name: str, size: int, folder: Path) -> dict[str, Path]:
    import torch

    from convtune.models.artifact import ONNX_FILE, OUTPUT_NAME
    from convtune.models.factory import create_model
    from convtune.training.export import export_onnx, write_graph

    model = create_model(name, 3, pretrained="none", img_size=size).eval()
    plain = folder / f"{name}-plain.onnx"
    write_graph(model, torch.randn(2, 3, size, size), plain, output_names=[OUTPUT_NAME])
    artifact = folder / name
    artifact.mkdir()
    explain = export_onnx(model, artifact)
    return {"plain": plain, "logits": artifact / ONNX_FILE, "explained": artifact / explain.graph}


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
            paths = export_graphs(name, size, Path(folder))
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
                        kind: logits_latency(session, pixels, args.repeats)
                        for kind, session in sessions.items()
                    }
                plain = median_of(rounds, key, "plain")
                median[key] = {f"{kind}_ms": median_of(rounds, key, kind) * 1e3 for kind in KINDS}
                median[key] |= {
                    f"{kind}_ratio": median_of(rounds, key, kind) / plain for kind in KINDS[1:]
                }
                print(f"{key}: " + ", ".join(f"{k} {v:.3f}" for k, v in median[key].items()))
            median[f"{name}/onnx_bytes"] = {
                kind: path.stat().st_size for kind, path in paths.items()
            }
            print(f"{name}: ONNX bytes {median[f'{name}/onnx_bytes']}")
    if args.out is not None:
        write_report(args.out, "explain-outputs", vars(args), median, rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
