"""What ``convtune export --quantize int8`` gives a run: the int8 graph's top-1 agreement
with the float graph on the run's val split, both graphs' accuracy there, and their
onnxruntime latency at batch 1 and at a large batch (alternating rounds, one thread,
medians), with the CPU's flags: integer kernels differ between CPUs with and without VNNI.

The int8 graph is kept whatever its agreement and accuracy, to be measured. Run as
``python -m convtune.benchmarks.quantize RUN_DIR [--out FILE] [--keep FOLDER]``; with
``--keep``, both artifacts stay in FOLDER (``float32/``, ``int8/``), for instance for
``convtune bench paired FOLDER/float32 --b-model FOLDER/int8``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from convtune.benchmarks.common import cpu_flags, logits_latency, median_of, write_report
from convtune.models.artifact import ONNX_FILE, read_manifest, write_manifest
from convtune.training.quantize import DEFAULT_CALIBRATION_IMAGES, DEFAULT_CALIBRATION_METHOD


def main() -> int:
    import onnxruntime as ort

    from convtune.training.export import build_artifact
    from convtune.training.quantize import quantize_artifact

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES)
    parser.add_argument("--calibration-method", default=DEFAULT_CALIBRATION_METHOD)
    parser.add_argument("--batches", default="1,32", help="batch sizes to time [1,32]")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--keep", type=Path, help="keep both artifacts in this new folder")
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    with contextlib.ExitStack() as stack:
        folder = args.keep or stack.enter_context(tempfile.TemporaryDirectory())
        graphs = {"float32": build_artifact(args.run_dir, Path(folder) / "float32")}
        graphs["int8"] = shutil.copytree(graphs["float32"], Path(folder) / "int8")
        quantization = quantize_artifact(
            graphs["int8"], args.run_dir, calibration_images=args.calibration_images,
            method=args.calibration_method, min_agreement=0.0, max_accuracy_drop=1.0,
        )  # fmt: skip
        float_manifest = read_manifest(graphs["float32"])
        write_manifest(graphs["int8"], replace(float_manifest, quantization=quantization))
        sessions = {
            name: ort.InferenceSession(str(path / ONNX_FILE), options)
            for name, path in graphs.items()
        }
        size = float_manifest.preprocessing.input_size
        rounds: list[dict] = [{} for _ in range(args.rounds)]
        median: dict = {"quantization": quantization.to_json(), "cpu_flags": cpu_flags()}
        for batch in (int(b) for b in args.batches.split(",")):
            pixels = np.random.default_rng(0).standard_normal((batch, 3, *size), np.float32)
            key = f"batch{batch}"
            for one_round in rounds:
                one_round[key] = {
                    name: logits_latency(session, pixels, args.repeats)
                    for name, session in sessions.items()
                }
            float_s, int8_s = median_of(rounds, key, "float32"), median_of(rounds, key, "int8")
            median[key] = {
                "float32_ms": float_s * 1e3, "int8_ms": int8_s * 1e3, "speedup": float_s / int8_s,
            }  # fmt: skip
            print(f"{key}: float32 {float_s * 1e3:.2f} ms, int8 {int8_s * 1e3:.2f} ms, "
                  f"speed-up {float_s / int8_s:.2f}x")  # fmt: skip
    print(f"top-1 agreement {quantization.agreement:.4f} on {quantization.validation_images} val "
          f"images; accuracy {quantization.val}; CPU flags {' '.join(cpu_flags())}")  # fmt: skip
    if args.out is not None:
        write_report(args.out, "quantize", vars(args), median, rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
