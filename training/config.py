"""The run configuration: defaults, overridden by a YAML file, overridden by flags.

The resolved configuration is written to ``RUN_DIR/CONFIG_FILE`` so a run can be read,
resumed and reproduced from its directory alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from convtune.data.datasets import LabelFileFormat
from convtune.models.artifact import CONFIG_FILE


@dataclass(frozen=True)
class FitConfig:
    data: str
    model: str
    out: str
    pretrained: str = "auto"
    epochs: int = 10
    img_size: int | None = None
    eval_img_size: int | None = None
    crop_pct: float | None = None
    crop_mode: str | None = None
    batch_size: int = 32
    freeze_epochs: int = 1
    lr: float = 0.01
    backbone_lr_scale: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    class_weights: str = "none"
    head_hidden: int = 0
    head_dropout: float = 0.0
    head_activation: str = "relu"
    random_crop: bool = True
    aug_scale_min: float = 0.25
    hflip: float = 0.5
    vflip: float = 0.0
    rotate90: bool = False
    affine_scale: float = 0.0
    affine_shift: float = 0.0
    affine_rotate: float = 0.0
    color_jitter: float = 0.2
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    path_column: str = "path"
    label_column: str = "label"
    label_separator: str = "auto"
    label_header: bool = True
    label_map: dict[str, str] | None = None
    binary_negative: list[str] | None = None
    skip_bad_images: bool = False
    monitor: str = "accuracy"
    early_stopping: int = 0
    num_workers: int = 2
    cache_images: bool = False
    cache_features: bool = False
    keep_bn_eval: bool = False
    bn_recalibrate: bool = True
    freeze_stages: int = 0
    ema_decay: float = 0.0
    tta: str = "none"
    time_limit: float | None = None
    precision: str = "auto"
    accelerator: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "freeze_epochs": 0 <= self.freeze_epochs <= self.epochs
            and not (self.cache_features and self.freeze_epochs == self.epochs),
            "lr": self.lr > 0,
            "optimizer": self.optimizer in ("sgd", "adamw"),
            "class_weights": self.class_weights in ("none", "auto"),
            "monitor": self.monitor in ("accuracy", "macro_f1", "loss"),
            "img_size": self.img_size is None or self.img_size >= 16,
            "eval_img_size": self.eval_img_size is None or self.eval_img_size >= 16,
            "crop_pct": self.crop_pct is None or 0.0 < self.crop_pct <= 1.0,
            "crop_mode": self.crop_mode in (None, "center", "squash", "border"),
            "freeze_stages": self.freeze_stages >= 0,
            "ema_decay": 0.0 <= self.ema_decay < 1.0,
            "tta": self.tta in ("none", "flip", "d4"),
            "time_limit": self.time_limit is None or self.time_limit > 0,
            "affine": min(self.affine_scale, self.affine_shift, self.affine_rotate) >= 0,
            "label_smoothing": 0.0 <= self.label_smoothing < 1.0,
            "label_separator": self.label_separator in ("auto", ",", "\t", ";", "whitespace"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                "invalid setting(s): " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad)
            )

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


def parse_label_map(text: str) -> dict[str, str]:
    """``"0.0=functional,1.0=defective"`` → ``{"0.0": "functional", "1.0": "defective"}``."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if not pairs or any(len(pair) != 2 or not all(p.strip() for p in pair) for pair in pairs):
        raise ValueError(f"--label-map wants RAW=NAME pairs separated by commas, got {text!r}")
    return {raw.strip(): name.strip() for raw, name in pairs}


def parse_names(text: str) -> list[str]:
    """``"a,b"`` → ``["a", "b"]``."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"expected comma-separated names, got {text!r}")
    return names


def option_names() -> list[str]:
    return [f.name for f in fields(FitConfig)]


def resolve_config(yaml_file: str | Path | None, overrides: dict[str, Any]) -> FitConfig:
    """Merge defaults < YAML file < explicit overrides; unknown keys are an error."""
    values: dict[str, Any] = {}
    if yaml_file is not None:
        loaded = yaml.safe_load(Path(yaml_file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{yaml_file} must hold a mapping of option: value")
        values.update({key.replace("-", "_"): value for key, value in loaded.items()})
    values.update(overrides)
    unknown = sorted(set(values) - set(option_names()))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known: {option_names()}")
    missing = [name for name in ("data", "model", "out") if values.get(name) is None]
    if missing:
        raise ValueError(f"missing required option(s): {', '.join('--' + m for m in missing)}")
    return FitConfig(**values)


def save_config(config: FitConfig, run_dir: Path) -> None:
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def load_saved_config(run_dir: Path) -> FitConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir} has no {CONFIG_FILE}: it is not a convtune run directory")
    return FitConfig(**yaml.safe_load(path.read_text()))
