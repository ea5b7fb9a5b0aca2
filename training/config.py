"""The fit configuration: defaults, overridden by a YAML file, overridden by flags.

:class:`FitConfig` is the one place where each option's name, type, default, allowed
values and help live; the ``convtune fit`` flags, the YAML keys and ``--print-config``
are derived from it. The resolved configuration is written to ``RUN_DIR/CONFIG_FILE`` so a
run can be read, resumed and reproduced from its directory alone.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from convtune.data.datasets import LabelFileFormat
from convtune.models.artifact import CONFIG_FILE


def option(
    default: Any = MISSING,
    *,
    help: str,
    unset: str | None = None,
    choices: tuple[str, ...] = (),
    parse: Callable[[str], Any] | None = None,
    flag: str | None = None,
) -> Any:
    """A :class:`FitConfig` field and what the command line needs to know about it.

    ``unset``: what a default of None means, shown as the default in ``--help``.
    ``choices``: the values allowed (None too when it is the default).
    ``parse``: turns the flag's text into the value, for types other than str/int/float.
    ``flag``: the command-line name when it is not the field's own (``--no-`` + name for a
    switch that is on by default, ``--`` + name otherwise).
    """
    about = {"help": help, "unset": unset, "choices": choices, "parse": parse, "flag": flag}
    return field(default=default, metadata=about)


def parse_label_map(text: str) -> dict[str, str]:
    """``"0.0=functional,1.0=defective"`` → ``{"0.0": "functional", "1.0": "defective"}``."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if not pairs or any(len(pair) != 2 or not all(p.strip() for p in pair) for pair in pairs):
        raise ValueError(f"--label-map wants RAW=NAME pairs separated by commas, got {text!r}")
    return {raw.strip(): name.strip() for raw, name in pairs}


def parse_devices(text: str) -> int | str:
    """``"4"`` → 4; ``"auto"`` and indices such as ``"0,2"`` as written (Lightning's forms)."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if text == "auto" or all(part.strip().isdigit() for part in text.split(",")):
        return text
    raise ValueError(f"--devices wants a count, auto, or indices like 0,2; got {text!r}")


def parse_names(text: str) -> list[str]:
    """``"a,b"`` → ``["a", "b"]``."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"expected comma-separated names, got {text!r}")
    return names


@dataclass(frozen=True)
class FitConfig:
    data: str = option(
        help="images: root/<class>/<image>, a pre-split root/<train|val|test>/<class>/<image>, "
        "a .csv/.tsv label file or a Hugging Face metadata.csv (see README: Your data)"
    )
    model: str = option(
        help="timm architecture name, e.g. tf_efficientnet_lite0, resnet50, test_vit"
    )
    out: str = option(help="run directory to create (config, split, logs, checkpoints, weights)")
    pretrained: str = option(
        "auto",
        help="encoder weights: auto (packaged if installed, else hub) | packaged | hub | none "
        "| FILE (.safetensors/.pth)",
    )
    epochs: int = option(10, help="training epochs, frozen ones included")
    img_size: int | None = option(
        None, help="input size in pixels for training, export and serving", unset="model's own"
    )
    eval_img_size: int | None = option(
        None, help="input size for evaluation, export and serving", unset="--img-size"
    )
    crop_pct: float | None = option(
        None, help="eval view: fraction of the image kept, 1.0 = all of it", unset="model's own"
    )
    crop_mode: str | None = option(
        None, help="eval view, timm's crop modes", choices=("center", "squash", "border"),
        unset="model's own",
    )  # fmt: skip
    batch_size: int = option(32, help="images per batch")
    freeze_epochs: int = option(1, help="epochs training only the head, encoder frozen")
    lr: float = option(0.01, help="peak learning rate of the head")
    backbone_lr_scale: float = option(0.1, help="encoder learning rate = lr × this once unfrozen")
    optimizer: str = option(
        "sgd", help="optimizer (sgd: Nesterov, with --momentum)", choices=("sgd", "adamw")
    )
    momentum: float = option(0.9, help="SGD momentum")
    weight_decay: float = option(1e-4, help="weight decay, not applied to norms and biases")
    warmup_epochs: float = option(0.5, help="linear warmup before cosine decay, in epochs")
    label_smoothing: float = option(0.1, help="cross-entropy label smoothing")
    class_weights: str = option(
        "none", help="loss weight per class (auto: inverse class frequency)",
        choices=("none", "auto"),
    )  # fmt: skip
    head_hidden: int = option(0, help="hidden units in the head, 0 for a linear head")
    head_dropout: float = option(0.0, help="dropout before the head's output layer")
    head_activation: str = option("relu", help="relu | gelu | silu | tanh | sigmoid")
    random_crop: bool = option(
        True, help="train on the whole image (the eval view) instead of RandomResizedCrop"
    )
    aug_scale_min: float = option(0.25, help="RandomResizedCrop minimum area fraction")
    hflip: float = option(0.5, help="horizontal flip probability")
    vflip: float = option(0.0, help="vertical flip probability")
    rotate90: bool = option(
        False, help="random 90-degree rotations (with both flips: the 8 symmetries of a square)"
    )
    affine_scale: float = option(0.0, help="random scale change of at most ± this fraction")
    affine_shift: float = option(0.0, help="random shift of at most ± this fraction of each side")
    affine_rotate: float = option(0.0, help="random rotation of at most ± this many degrees")
    color_jitter: float = option(0.2, help="brightness/contrast/saturation jitter strength")
    val_data: str | None = option(
        None, help="validation images (class folders or label file), instead of a val part "
        "of --data", unset="--data's val part, or --val-fraction of train",
    )  # fmt: skip
    test_data: str | None = option(
        None, help="test images (class folders or label file), instead of a test part of --data",
        unset="--data's test part, or --test-fraction of train",
    )  # fmt: skip
    val_fraction: float = option(
        0.2, help="fraction of each class held out for validation, when the data has no val part"
    )
    test_fraction: float = option(
        0.0, help="fraction of each class held out for testing, when the data has no test part"
    )
    path_column: str = option("path", help="label file: column with image paths")
    label_column: str = option("label", help="label file: column with class names")
    label_separator: str = option(
        "auto", help="label file: column separator",
        choices=("auto", ",", "\t", ";", "whitespace"),
    )  # fmt: skip
    label_header: bool = option(
        True, help="label file has no header; columns are 0-based numbers", flag="--no-header"
    )
    label_map: dict[str, str] | None = option(  # noqa: RUF009 (a dataclasses.field)
        None, help="RAW=NAME,... renames labels; its order is the class order",
        parse=parse_label_map, unset="labels as written",
    )  # fmt: skip
    binary_negative: list[str] | None = option(  # noqa: RUF009 (a dataclasses.field)
        None, help="CLASS,...: negative side of a binary view", parse=parse_names,
        unset="no binary view",
    )  # fmt: skip
    skip_bad_images: bool = option(
        False, help="drop unreadable images (and say how many) instead of failing"
    )
    allow_duplicates: bool = option(
        False, help="train even when a copy of an image is in two parts (train and val/test) "
        "or in two classes",
    )  # fmt: skip
    monitor: str = option(
        "accuracy", help="val metric choosing the best checkpoint",
        choices=("accuracy", "macro_f1", "loss"),
    )  # fmt: skip
    early_stopping: int = option(0, help="stop after this many epochs without improvement, 0 = off")
    num_workers: int = option(2, help="DataLoader worker processes")
    cache_images: bool = option(
        False, help="decode every image once and keep it in memory (datasets that fit in RAM)"
    )
    cache_features: bool = option(
        False, help="run the frozen epochs as a linear probe on encoder features computed once"
    )
    keep_bn_eval: bool = option(
        False,
        help="keep the encoder's BatchNorm statistics frozen after unfreezing (small/odd data)",
    )
    bn_recalibrate: bool = option(
        True,
        help="keep ImageNet's BatchNorm statistics instead of re-estimating them on training "
        "images",
    )
    freeze_stages: int = option(
        0, help="encoder stages kept frozen (BatchNorm in eval) while fine-tuning"
    )
    ema_decay: float = option(
        0.0, help="exponential moving average of the weights, e.g. 0.998; 0 = off"
    )
    tta: str = option(
        "none", help="test-time views for calibration and the report",
        choices=("none", "flip", "d4"),
    )  # fmt: skip
    time_limit: float | None = option(
        None, help="seconds for the whole run: epochs are planned to fit", unset="none"
    )
    precision: str = option(
        "auto", help="auto (bf16 on GPUs and CPUs that compute it natively, else fp32 on the "
        "CPU) | 32-true | bf16-mixed | 16-mixed",
    )  # fmt: skip
    compile: bool = option(
        False, help="torch.compile the training and validation steps (on the CPU it needs a "
        "C++ compiler; the first steps of each kind take longer while it compiles, which "
        "--time-limit's plan does not foresee)",
    )  # fmt: skip
    accelerator: str = option("auto", help="auto | cpu | gpu (Lightning's accelerators)")
    # One device unless asked: Lightning's own default (every GPU) would start a process
    # per GPU, each repeating what fit does around training.
    devices: int | str = option(
        1, help="devices per node, each its own training process: a count, auto (all), or "
        "GPU indices like 0,2; --batch-size is per device", parse=parse_devices,
    )  # fmt: skip
    strategy: str = option(
        "auto", help="Lightning's strategy: auto (one device; ddp for several) | ddp | "
        "ddp_spawn | fsdp | deepspeed ... (README: Several GPUs or machines)",
    )  # fmt: skip
    num_nodes: int = option(1, help="machines training together (torchrun, SLURM)")
    logger: str = option(
        "csv", help="where metrics go besides RUN_DIR/logs (CSV, always written); mlflow: "
        "$MLFLOW_TRACKING_URI [./mlruns], tensorboard: RUN_DIR/tensorboard",
        choices=("csv", "tensorboard", "mlflow"),
    )  # fmt: skip
    seed: int = option(0, help="seed for the split, init and augmentation")

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "freeze_epochs": 0 <= self.freeze_epochs <= self.epochs
            and not (self.cache_features and self.freeze_epochs == self.epochs),
            "lr": self.lr > 0,
            "img_size": self.img_size is None or self.img_size >= 16,
            "eval_img_size": self.eval_img_size is None or self.eval_img_size >= 16,
            "crop_pct": self.crop_pct is None or 0.0 < self.crop_pct <= 1.0,
            "freeze_stages": self.freeze_stages >= 0,
            "ema_decay": 0.0 <= self.ema_decay < 1.0,
            "time_limit": self.time_limit is None or self.time_limit > 0,
            "affine": min(self.affine_scale, self.affine_shift, self.affine_rotate) >= 0,
            "label_smoothing": 0.0 <= self.label_smoothing < 1.0,
            "val_fraction": 0.0 < self.val_fraction < 1.0,
            "test_fraction": 0.0 <= self.test_fraction < 1.0 - self.val_fraction,
            "devices": not isinstance(self.devices, int) or self.devices >= 1 or self.devices == -1,
            "num_nodes": self.num_nodes >= 1,
        }
        for spec in fields(self):
            if allowed := spec.metadata["choices"]:
                value = getattr(self, spec.name)
                checks[spec.name] = value in allowed or (value is None and spec.default is None)
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid setting(s): " + ", ".join(self._described(n) for n in bad))

    def _described(self, name: str) -> str:
        """``name=value``, and the values allowed where the option has a list of them."""
        allowed = next((f.metadata["choices"] for f in fields(self) if f.name == name), ())
        shown = f"{name}={getattr(self, name)!r}"
        return f"{shown} (one of {', '.join(allowed)})" if allowed else shown

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def label_format(self) -> LabelFileFormat:
        return LabelFileFormat(
            separator=self.label_separator,
            header=self.label_header,
            path_column=str(self.path_column),
            label_column=str(self.label_column),
            label_map=tuple((str(k), str(v)) for k, v in self.label_map.items())
            if self.label_map
            else None,
        )

    # The keyword arguments of the dataclasses this configuration sets, in the style of
    # timm's ``optimizer_kwargs(cfg)``: data and models cannot import training, and the
    # LightningModule should not need this module, so the mapping from option names to
    # their fields lives here, next to the defaults, and those dataclasses keep none.

    def head_kwargs(self) -> dict[str, Any]:
        """``models.factory.HeadConfig``'s fields."""
        return {
            "hidden_features": self.head_hidden,
            "dropout": self.head_dropout,
            "activation": self.head_activation,
        }

    def augmentation_kwargs(self) -> dict[str, Any]:
        """``data.transforms.Augmentation``'s fields."""
        return {
            "random_crop": self.random_crop,
            "scale": (self.aug_scale_min, 1.0),
            "hflip": self.hflip,
            "vflip": self.vflip,
            "rotate90": self.rotate90,
            "affine_scale": self.affine_scale,
            "affine_shift": self.affine_shift,
            "affine_rotate": self.affine_rotate,
            "color_jitter": self.color_jitter,
        }

    def recipe_kwargs(
        self, *, class_weights: tuple[float, ...] | None = None, freeze_epochs: int = 0
    ) -> dict[str, Any]:
        """``training.module.Recipe``'s fields. Fit decides the last two from the data and
        the schedule: the weight of each class (with ``class_weights: auto``) and the epoch
        the encoder starts learning; without them, no weights and from the start."""
        return {
            "lr": self.lr,
            "backbone_lr_scale": self.backbone_lr_scale,
            "optimizer": self.optimizer,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "warmup_epochs": self.warmup_epochs,
            "label_smoothing": self.label_smoothing,
            "class_weights": class_weights,
            "freeze_epochs": freeze_epochs,
        }


@dataclass(frozen=True)
class CommandLineOption:
    """One FitConfig field as a command-line flag."""

    name: str
    flag: str
    help: str
    # Turns the flag's text into the value; None for an on/off switch (no value).
    parse: Callable[[str], Any] | None
    default: Any


def command_line_options() -> list[CommandLineOption]:
    """Every FitConfig field as a flag: ``--`` + its name with dashes; a bool is a switch
    that flips its default (``--no-`` + name when on by default); the help ends with the
    choices and the default."""
    hints = typing.get_type_hints(FitConfig)
    options = []
    for spec in fields(FitConfig):
        about = spec.metadata
        dashed = spec.name.replace("_", "-")
        switch = hints[spec.name] is bool
        flag = about["flag"] or ("--no-" if switch and spec.default else "--") + dashed
        options.append(
            CommandLineOption(
                name=spec.name,
                flag=flag,
                help=_help_text(spec, switch=switch),
                parse=None if switch else _parser(spec, hints[spec.name]),
                default=spec.default,
            )
        )
    return options


def _help_text(spec: Field, *, switch: bool) -> str:
    about = spec.metadata
    text = about["help"]
    if about["choices"]:
        text += ": " + " | ".join(_shown(choice) for choice in about["choices"])
    if switch or spec.default is MISSING:
        return text  # a switch's flag says what it changes; a required option has no default
    if spec.default is None:
        if about["unset"] is None:
            raise TypeError(f"FitConfig.{spec.name}: a None default needs unset= to describe it")
        return f"{text} [{about['unset']}]"
    return f"{text} [{_shown(spec.default)}]"


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)[1:-1] if isinstance(value, str) else str(value)


def _parser(spec: Field, hint: Any) -> Callable[[str], Any]:
    if spec.metadata["parse"] is not None:
        return spec.metadata["parse"]
    if isinstance(hint, types.UnionType):  # ``int | None``: the flag gives the int
        (hint,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
    if hint not in (str, int, float):
        raise TypeError(f"FitConfig.{spec.name}: {hint} needs parse= to read it from a flag")
    return hint


def option_names() -> list[str]:
    return [f.name for f in fields(FitConfig)]


def resolve_config(
    yaml_file: str | Path | None, overrides: dict[str, Any], *, resume: bool = False
) -> FitConfig:
    """Merge defaults < YAML file < explicit overrides; unknown keys are an error.

    With ``resume`` the run directory's saved configuration (``overrides["out"]``) takes
    the place of the defaults and the YAML file.
    """
    if resume:
        if overrides.get("out") is None:
            raise ValueError("--resume needs --out RUN_DIR")
        values = load_saved_config(Path(overrides["out"])).to_dict()
    else:
        values = {} if yaml_file is None else _read_yaml(Path(yaml_file))
    values.update(overrides)
    unknown = sorted(set(values) - set(option_names()))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known: {option_names()}")
    missing = [name for name in ("data", "model", "out") if values.get(name) is None]
    if missing:
        raise ValueError(f"missing required option(s): {', '.join('--' + m for m in missing)}")
    return FitConfig(**values)


def _read_yaml(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must hold a mapping of option: value")
    return {key.replace("-", "_"): value for key, value in loaded.items()}


def config_yaml(config: FitConfig) -> str:
    """The YAML that ``--config`` reads back into ``config``."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def save_config(config: FitConfig, run_dir: Path) -> None:
    (run_dir / CONFIG_FILE).write_text(config_yaml(config))


def load_saved_config(run_dir: Path) -> FitConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir} has no {CONFIG_FILE}: it is not a convtune run directory")
    return FitConfig(**yaml.safe_load(path.read_text()))
