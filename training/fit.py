"""One fine-tuning run, from a dataset path to ``RUN_DIR/model.safetensors``.

A run directory holds everything needed to resume, evaluate and export it::

    config.yaml          the resolved configuration
    split.json           the exact train/val/test images (reused by resume and evaluate)
    classes.json         class names in output order
    logs/version_N/      metrics.csv per attempt (resuming starts a new version)
    checkpoints/         best.ckpt and last.ckpt (Lightning, for --resume)
    model.safetensors    the best weights (by the monitored val metric)
    model.json           how to rebuild the model, its temperature and val metrics
    metrics.json         with a test part: the test metrics (see training/report.py)
    report.html          with a test part: the evaluation report
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import save_file

from data.datamodule import ImageDataModule
from data.sources import LabelledImages, drop_unreadable, load_labelled_images
from data.splits import SPLIT_FILE, Split, load_split, save_split, stratified_split
from data.transforms import Augmentation
from models.factory import HeadConfig, ImageClassifier, create_model
from training.calibration import collect_logits, fit_temperature
from training.callbacks import EncoderFreeze
from training.config import FitConfig, save_config
from training.evaluate import evaluation_metrics
from training.history import read_history, write_probe_history
from training.module import ClassifierModule, Recipe
from training.probe import linear_probe
from training.report import report_title, write_report

log = logging.getLogger("convtune")
MODEL_WEIGHTS = "model.safetensors"
MODEL_DESCRIPTION = "model.json"
_MONITOR_MODE = {"accuracy": "max", "macro_f1": "max", "loss": "min"}
_SUMMARY_KEYS = ("n", "accuracy", "macro_f1", "nll", "ece", "temperature")


def fit(config: FitConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train as configured; return the best model's val (and test) metrics."""
    run_dir = Path(config.out)
    last_checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if resume and not last_checkpoint.is_file():
        raise FileNotFoundError(f"cannot resume: {last_checkpoint} does not exist")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir)
    L.seed_everything(config.seed, workers=True, verbose=False)

    images, split = prepare_split(config, run_dir)
    (run_dir / "classes.json").write_text(json.dumps(list(images.classes), indent=1))
    model = build_model(config, len(images.classes))
    datamodule = build_datamodule(config, images, split, model)
    recipe = build_recipe(config, images.subset(list(split.train)))
    module = ClassifierModule(model, recipe)
    # With --cache-features the frozen epochs run as a linear probe before Lightning
    # takes over, and the trainer only runs the unfrozen ones.
    probe = config.cache_features and config.freeze_epochs > 0
    if probe and not resume:
        datamodule.setup("fit")
        write_probe_history(
            run_dir,
            linear_probe(model, datamodule, recipe, epochs=config.freeze_epochs, seed=config.seed),
        )
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=f"val/{config.monitor}",
        mode=_MONITOR_MODE[config.monitor],
        save_last=True,
        enable_version_counter=False,
    )
    callbacks: list[L.Callback] = [
        checkpoint,
        EncoderFreeze(0 if probe else config.freeze_epochs, keep_bn_eval=config.keep_bn_eval),
        RichProgressBar(),
    ]
    if config.early_stopping > 0:
        callbacks.append(
            EarlyStopping(
                monitor=f"val/{config.monitor}",
                mode=_MONITOR_MODE[config.monitor],
                patience=config.early_stopping,
            )
        )
    trainer = L.Trainer(
        max_epochs=config.epochs - config.freeze_epochs if probe else config.epochs,
        accelerator=config.accelerator,
        precision=resolve_precision(config.precision),
        callbacks=callbacks,
        # One logs/version_N/ per attempt, so resuming never overwrites earlier metrics.
        logger=CSVLogger(run_dir, name="logs"),
        deterministic=False,
        log_every_n_steps=1,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=last_checkpoint if resume else None)

    best = checkpoint.best_model_path or str(last_checkpoint)
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    return finish_run(model.cpu(), datamodule, config, run_dir)


def finish_run(
    model: ImageClassifier, datamodule: ImageDataModule, config: FitConfig, run_dir: Path
) -> dict[str, Any]:
    """Calibrate on val, save the model, and report on the test part if there is one."""
    classes = datamodule.images.classes
    val_logits, val_labels = collect_logits(model, datamodule.val_dataloader())
    temperature = fit_temperature(val_logits, val_labels)
    val = evaluation_metrics(
        val_logits, val_labels, classes, temperature=temperature,
        binary_negative=config.binary_negative,
    )  # fmt: skip
    summary = {"val": {key: val[key] for key in _SUMMARY_KEYS}}
    save_trained_model(model, run_dir, classes=classes, metrics=summary["val"],
                       temperature=temperature)  # fmt: skip
    if datamodule.split.test:
        test_logits, test_labels = collect_logits(model, datamodule.test_dataloader())
        test = evaluation_metrics(
            test_logits, test_labels, classes, temperature=temperature,
            binary_negative=config.binary_negative,
        )  # fmt: skip
        report = write_report(
            run_dir, {"split": "test", **test}, logits=test_logits, labels=test_labels,
            paths=datamodule.part("test").paths, classes=classes,
            title=report_title(model=config.model, data_path=config.data, run_dir=config.out,
                               split="test"),
            history=read_history(run_dir),
        )  # fmt: skip
        summary["test"] = {key: test[key] for key in _SUMMARY_KEYS}
        summary["report"] = str(report)
    return summary


def build_model(config: FitConfig, num_classes: int) -> ImageClassifier:
    model = create_model(
        config.model,
        num_classes,
        pretrained=config.pretrained,
        img_size=config.img_size,
        head=HeadConfig(config.head_hidden, config.head_dropout, config.head_activation),
    )
    # Channels-last convolution weights make every convolution run in NHWC: on CPU (oneDNN)
    # training steps ran ~1.5x faster for tf_efficientnet_lite0 (docs/benchmarks.md), and it
    # is what tensor cores want on GPUs. Saved weights are made contiguous again.
    return model.to(memory_format=torch.channels_last)


def build_datamodule(
    config: FitConfig, images: LabelledImages, split: Split, model: ImageClassifier
) -> ImageDataModule:
    return ImageDataModule(
        images,
        split,
        model.preprocessing,
        augmentation=Augmentation(
            scale=(config.aug_scale_min, 1.0),
            hflip=config.hflip,
            vflip=config.vflip,
            color_jitter=config.color_jitter,
        ),
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        cache_images=config.cache_images,
        seed=config.seed,
    )


def prepare_split(config: FitConfig, run_dir: Path) -> tuple[LabelledImages, Split]:
    """Load the dataset, drop or refuse unreadable files, and reuse or create the split."""
    images = load_labelled_images(config.data, config.label_format())
    images, bad = drop_unreadable(images, skip_bad_images=config.skip_bad_images)
    if bad:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(bad), bad[0][1])
    split_file = run_dir / SPLIT_FILE
    if split_file.is_file():
        return images, load_split(split_file, images)
    split = stratified_split(
        images.labels,
        images.classes,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
    )
    save_split(split_file, images, split, seed=config.seed)
    return images, split


def build_recipe(config: FitConfig, train_images: LabelledImages) -> Recipe:
    weights = None
    if config.class_weights == "auto":
        counts = np.bincount(train_images.labels, minlength=len(train_images.classes))
        weights = tuple(float(w) for w in len(train_images) / (len(counts) * counts))
    return Recipe(
        lr=config.lr,
        backbone_lr_scale=config.backbone_lr_scale,
        optimizer=config.optimizer,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        warmup_epochs=config.warmup_epochs,
        label_smoothing=config.label_smoothing,
        class_weights=weights,
    )


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 mixed precision on GPUs that support it, fp16 mixed on other GPUs,
    fp32 on the CPU."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def save_trained_model(
    model: ImageClassifier,
    run_dir: Path,
    *,
    classes: tuple[str, ...],
    metrics: dict,
    temperature: float,
) -> None:
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, run_dir / MODEL_WEIGHTS)
    description = {
        **model.describe(),
        "classes": list(classes),
        "temperature": temperature,
        "val_metrics": metrics,
    }
    (run_dir / MODEL_DESCRIPTION).write_text(json.dumps(description, indent=2))
