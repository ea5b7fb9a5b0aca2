"""The ``convtune bench`` command: each benchmark's options, and the extras it needs.

The parser lives here, apart from the benchmarks, so that ``--help`` and a missing extra
are answered before torch, lightning or a server is loaded. ``python -m
convtune.benchmarks.cli`` is the same command in a checkout.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from convtune.benchmarks.common import missing_distributions

DEV_EXTRA_INSTALL = "pip install -e '.[dev]'"
# Distributions of the dev extra (pyproject.toml) that `bench serve` needs: the load
# generator and the server runner, and, with --peers naive, the naive FastAPI peer (the
# BentoML peer needs only what the service needs).
SERVE_NEEDS = ("httpx", "psutil")
NAIVE_PEER_NEEDS = ("fastapi", "python-multipart")
SERVE_PEERS = ("naive", "bentoml")  # what `bench serve --peers` may name (benchmarks.serve)

# Fit settings `bench train` takes as flags: (flag, FitConfig field, type, help).
TRAIN_FIT_OPTIONS: tuple[tuple[str, str, Any, str], ...] = (
    ("--model", "model", str, "timm architecture"),
    ("--pretrained", "pretrained", str, "encoder weights, as for convtune fit"),
    ("--img-size", "img_size", int, "input size"),
    ("--batch-size", "batch_size", int, "images per batch"),
    ("--num-workers", "num_workers", int, "DataLoader worker processes"),
    ("--freeze-epochs", "freeze_epochs", int, "frozen epochs to compare"),
)
# Where `bench train` departs from convtune fit's defaults: a model a CPU trains in
# seconds, and as many frozen epochs as configs/elpv.yaml's probe, since the probe's
# speed-up grows with them (docs/benchmarks.md, Training).
TRAIN_FIT_DEFAULTS: dict[str, Any] = {
    "model": "tf_efficientnet_lite0",
    "batch_size": 16,
    "freeze_epochs": 10,
}
TRAIN_MEASUREMENTS = ("steps", "pipeline", "frozen", "features", "precision")
# `precision` only when asked for: its cold torch.compile takes minutes on a small CPU;
# `features` too: it encodes the train and val images twice a round.
TRAIN_DEFAULT_PARTS = ("steps", "pipeline", "frozen")


def add_upload_arguments(parser: argparse.ArgumentParser) -> None:
    """The images a service benchmark sends (``benchmarks.serve.uploads_for``)."""
    parser.add_argument(
        "--images", type=Path,
        help="folder of images to send, in turn [generated images of shapes]",
    )  # fmt: skip
    parser.add_argument("--image-count", type=int, default=32, help="generated images [32]")
    parser.add_argument("--image-size", type=int, default=300, help="generated size [300]")
    parser.add_argument(
        "--image-format", default="PNG", choices=["PNG", "JPEG"], help="generated format [PNG]"
    )


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL", help="artifact directory or NAME[:VERSION] in the BentoML store"
    )
    add_upload_arguments(parser)
    parser.add_argument(
        "--concurrency", default="1,8",
        help="client counts, comma-separated; goals use 1 and the highest [1,8]",
    )  # fmt: skip
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per load [20]")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first [3]")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions, medians taken [3]")
    parser.add_argument(
        "--ceiling-seconds", type=float, default=3.0, help="timing per batch size [3]"
    )
    parser.add_argument(
        "--peers", type=peer_names, default=SERVE_PEERS, metavar="NAMES",
        help="peers loaded in the same rounds, comma-separated: naive (FastAPI + torch), "
        "bentoml (BentoML's batchable image API on onnxruntime), or none [naive,bentoml]",
    )  # fmt: skip
    parser.add_argument(
        "--no-peer", dest="peers", action="store_const", const=(), help="no peers: --peers none"
    )
    parser.add_argument(
        "--serve-tta", metavar="VIEWS",
        help="none | flip | d4: serve a copy of the artifact set to average over these views "
        "(export --serve-tta); the ceiling and the peer stay single-view [as exported]",
    )  # fmt: skip
    parser.add_argument(
        "--service-env", action="append", default=[], metavar="NAME=VALUE",
        help="environment for the service (tuning: CONVTUNE_*); repeatable",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the rounds and medians here")


def add_paired_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL",
        help="side A's artifact directory or NAME[:VERSION] in the BentoML store",
    )  # fmt: skip
    parser.add_argument(
        "--b-model", metavar="MODEL", help="side B's artifact, e.g. an int8 export [MODEL]"
    )
    for side in ("a", "b"):
        parser.add_argument(
            f"--{side}-ref", metavar="REVISION",
            help=f"side {side.upper()}'s service code: this checkout's files at a git revision "
            "[the working tree]",
        )  # fmt: skip
        parser.add_argument(
            f"--{side}-env", action="append", default=[], metavar="NAME=VALUE",
            help=f"side {side.upper()}'s service environment (CONVTUNE_*); repeatable",
        )  # fmt: skip
    add_upload_arguments(parser)
    parser.add_argument("--concurrency", default="1,8", help="client counts, comma-separated [1,8]")
    parser.add_argument("--pairs", type=int, default=6, help="pairs of loads [6]")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load [5]")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first [1]")
    parser.add_argument(
        "--stage-seconds", type=float, default=1.0,
        help="in-process timing of each stage (decode, preprocess, model) per side [1]",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write every pair and the medians here")


def peer_names(text: str) -> tuple[str, ...]:
    """``--peers``' value: the peers it names, in :data:`SERVE_PEERS`' order."""
    names = {name.strip() for name in text.split(",")} - {"", "none"}
    if unknown := names - set(SERVE_PEERS):
        raise argparse.ArgumentTypeError(
            f"unknown peer {', '.join(sorted(unknown))}; choose from {', '.join(SERVE_PEERS)}"
            " or none"
        )
    return tuple(name for name in SERVE_PEERS if name in names)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path,
        help="a `convtune fit` YAML file: benchmark its model, data, sizes and recipe",
    )  # fmt: skip
    for flag, field, kind, text in TRAIN_FIT_OPTIONS:
        default = TRAIN_FIT_DEFAULTS.get(field, "as convtune fit")
        # No argparse default: the benchmark tells an explicit flag from the config's.
        parser.add_argument(
            flag, dest=field, type=kind, help=f"{text} [{default}, or the config's]"
        )
    parser.add_argument(
        "--data", help="folder tree or label file [the config's, or generated 300×300 shapes]"
    )
    parser.add_argument("--per-class", type=int, default=64, help="generated images per class")
    parser.add_argument("--steps", type=int, default=16, help="timed training steps [16]")
    parser.add_argument("--skip-steps", type=int, default=2, help="untimed steps first [2]")
    parser.add_argument("--pipeline-batches", type=int, default=20, help="timed batches [20]")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions, medians taken [3]")
    parser.add_argument(
        "--variants", default="fp32,bf16,compile",
        help="precision: the step's variants to time, fp32 (the baseline) among them: fp32, "
        "bf16 (autocast), compile (torch.compile at --precision auto's choice) "
        "[fp32,bf16,compile]",
    )  # fmt: skip
    parser.add_argument(
        "--epoch-images", type=int, default=1575,
        help="precision: the epoch over which torch.compile's time is amortised, in images "
        "[1575, the ELPV demo's training cells]",
    )  # fmt: skip
    parser.add_argument(
        "--parts", default=",".join(TRAIN_DEFAULT_PARTS),
        help=f"comma-separated subset of {', '.join(TRAIN_MEASUREMENTS)} "
        f"[{','.join(TRAIN_DEFAULT_PARTS)}]",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the rounds and medians here")


def add_check_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images", type=Path,
        help="folder of images, searched recursively [ELPV's, if elpv-dataset is installed, "
        "else generated grayscale PNGs]",
    )  # fmt: skip
    parser.add_argument("--image-count", type=int, default=2624, help="generated images [2624]")
    parser.add_argument("--image-size", type=int, default=300, help="generated size [300]")
    parser.add_argument(
        "--workers", default="1,2", help="thread counts of the check, comma-separated [1,2]"
    )
    parser.add_argument("--rounds", type=int, default=5, help="repetitions, medians taken [5]")
    parser.add_argument("--json", type=Path, help="write the rounds and medians here")


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL", help="artifact directory or NAME[:VERSION] in the BentoML store"
    )
    parser.add_argument(
        "--images", type=Path, help="folder of images to classify [generated PNGs of shapes]"
    )
    parser.add_argument("--image-count", type=int, default=1000, help="generated PNGs [1000]")
    parser.add_argument("--image-size", type=int, default=300, help="generated size [300]")
    parser.add_argument(
        "--batch-sizes", default="8,16,32,64",
        help="the ceiling's batch sizes, comma-separated; the best counts [8,16,32,64]",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="repetitions, medians taken [3]")
    parser.add_argument(
        "--cold-starts", type=int, default=7, help="one-image runs, median taken [7]"
    )
    parser.add_argument(
        "--rss-counts", default="1000,10000",
        help="image counts to measure peak memory at, comma-separated; empty: none "
        "[1000,10000]",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the rounds and medians here")


def add_decode_bombs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=3, help="repetitions, medians taken [3]")
    parser.add_argument("--json", type=Path, help="write the rounds and medians here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convtune bench",
        description="Benchmarks from a source checkout's benchmarks/ (docs/benchmarks.md).",
    )
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    add_serve_arguments(
        benchmarks.add_parser(
            "serve",
            help="the service against the in-process ceiling, a naive FastAPI peer and a "
            "BentoML one",
            description="Benchmark the service against the in-process onnxruntime ceiling, "
            "a naive FastAPI + torch peer and the BentoML service its docs teach, on the same "
            "artifact and images.",
        )
    )
    add_paired_arguments(
        benchmarks.add_parser(
            "paired",
            help="two services (artifacts, code revisions or settings) loaded in turn; "
            "each request's CPU split by stage",
            description="Compare two services, A and B, on one machine: they differ by "
            "artifact (--b-model), by code (--a-ref/--b-ref) or by environment "
            "(--a-env/--b-env). Both run at once and are loaded in turn, the order swapped "
            "every other pair; the verdicts are per-pair ratios. Each side's CPU per request "
            "is split into client, event loop, decode, preprocess and inference.",
        )
    )
    add_train_arguments(
        benchmarks.add_parser(
            "train",
            help="Lightning against a plain loop, data against model, probe against epochs, "
            "onnxruntime features against torch's, bf16 and torch.compile against fp32",
            description="Benchmark training: Lightning against a plain loop, the data "
            "pipeline against the model, the cached-feature probe against normal frozen "
            "epochs, (--parts features) the probe's encoding on onnxruntime against torch, "
            "and (--parts precision) the step in bf16 autocast and under torch.compile "
            "against fp32.",
        )
    )
    add_check_data_arguments(
        benchmarks.add_parser(
            "check-data",
            help="the data check (hash + header) against a full decode of each image",
            description="Benchmark check_dataset (convtune check-data) against decoding "
            "every image, on the same files with a warm file cache.",
        )
    )
    add_predict_arguments(
        benchmarks.add_parser(
            "predict",
            help="convtune predict against the in-process ceiling; cold start; memory",
            description="Benchmark convtune predict end to end against the in-process "
            "decode + onnxruntime ceiling, its cold start on one image, and its peak memory "
            "as the number of images grows.",
        )
    )
    add_decode_bombs_arguments(
        benchmarks.add_parser(
            "decode-bombs",
            help="hostile images' decode cost with and without the structure rules",
            description="Decode each hostile image (data/image_rules.py) in a fresh process, "
            "with the rules and without, and the costliest images the rules allow.",
        )
    )
    return parser


def needed_distributions(args: argparse.Namespace) -> tuple[str, ...]:
    if args.benchmark == "serve":
        return SERVE_NEEDS + (NAIVE_PEER_NEEDS if "naive" in args.peers else ())
    if args.benchmark == "paired":
        return SERVE_NEEDS
    return ()


def main(argv: list[str]) -> int:
    """Run the benchmark ``argv`` names (``serve ...``, ``paired ...``, ``train ...``,
    ``check-data ...``, ``predict ...`` or ``decode-bombs ...``); its exit status."""
    args = build_parser().parse_args(argv)
    missing = missing_distributions(needed_distributions(args))
    if missing:
        print(
            f"convtune bench {args.benchmark} needs {', '.join(missing)} from the dev extra: "
            f"{DEV_EXTRA_INSTALL}",
            file=sys.stderr,
        )
        return 2
    try:
        # Each benchmark's module is imported only when it runs: their imports are heavy.
        module = importlib.import_module(f"convtune.benchmarks.{args.benchmark.replace('-', '_')}")
        return module.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # As `convtune`'s other commands: our errors carry a message meant for the user.
        print(f"convtune bench {args.benchmark}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
