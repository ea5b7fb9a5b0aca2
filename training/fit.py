"""One fine-tuning run, from a dataset path to ``RUN_DIR/MODEL_WEIGHTS``.

The run directory holds everything needed to resume, evaluate and export it; its layout
is in ``models/artifact.py``. The best weights are chosen by the monitored val metric,
among the fine-tuned epochs' and, with --cache-features, the linear probe's.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from convtune.data.checks import check_dataset, plan_split, print_check
from convtune.data.datamodule import ImageDataModule, drops_last_batch
from convtune.data.datasets import DatasetError, LabelledImages
from convtune.data.layouts import open_dataset
from convtune.data.splits import PARTS, Split, load_split, save_split
from convtune.data.transforms import Augmentation
from convtune.models.artifact import (
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    LAST_CHECKPOINT,
    MODEL_WEIGHTS,
    SPLIT_FILE,
    ModelDescription,
    write_model_description,
)
from convtune.models.factory import HeadConfig, ImageClassifier, create_model, first_stages
from convtune.models.inference import VIEW_SETS, softmax
from convtune.training.batchnorm import recalibrate_batchnorm
from convtune.training.budget import plan_epochs, time_eval_batch, time_train_step
from convtune.training.calibration import collect_logits, collect_view_logits, fit_temperatures
from convtune.training.callbacks import EncoderFreeze, WeightEMA
from convtune.training.compilation import compiled_for_training
from convtune.training.config import FitConfig, save_config
from convtune.training.devices import (
    Processes,
    SameSplitEverywhere,
    check_batches_per_process,
    choose_precision,
    plan_processes,
    share_cpu_cores,
    speaking_if,
    split_digest,
    trainer_devices,
)
from convtune.training.evaluate import evaluation_metrics_with_views
from convtune.training.explain import torch_explainer
from convtune.training.history import read_history, write_probe_history
from convtune.training.metrics import classification_metrics, negative_log_likelihood
from convtune.training.module import ClassifierModule, Recipe
from convtune.training.probe import ProbeResult, linear_probe
from convtune.training.report import report_title, write_report
from convtune.training.tracking import (
    build_loggers,
    check_logger_ready,
    finish_tracking,
    start_tracking,
)

log = logging.getLogger("convtune")
_MONITOR_MODE = {"accuracy": "max", "macro_f1": "max", "loss": "min"}
# Enough for stable BatchNorm means and variances; more images only take longer.
_RECALIBRATION_IMAGES = 256
_SUMMARY_KEYS = ("n", "accuracy", "macro_f1", "nll", "ece", "temperature")
_LIGHTNING_NOISE = (
    r".*isinstance\(treespec, LeafSpec\)",  # torch deprecating what Lightning's own code calls
    r"Found \d+ module\(s\) in eval mode",  # frozen stages hold their BatchNorm in eval
)


@contextmanager
def without_lightning_chatter() -> Iterator[None]:
    """Lightning's INFO lines (which accelerators exist, a cloud-logging advertisement, why
    ``fit`` stopped) and the warnings it raises about itself or about what the recipe does
    on purpose (a frozen encoder's BatchNorm in eval mode) tell the user nothing about their
    run; its other warnings still show."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = rank_zero.level
    rank_zero.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in _LIGHTNING_NOISE:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        rank_zero.setLevel(level)


@without_lightning_chatter()
def fit(config: FitConfig, *, resume: bool = False) -> dict[str, Any] | None:
    """Train as configured; return the best model's val (and test) metrics. With several
    training processes (training/devices.py) only the main one writes and returns them;
    the others return None."""
    started = time.monotonic()
    processes = plan_processes(config, freezes_parameters=freezes_in_trainer(config))
    check_logger_ready(config.logger)
    run_dir = Path(config.out)
    last_checkpoint = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    if resume and not last_checkpoint.is_file():
        raise FileNotFoundError(f"cannot resume: {last_checkpoint} does not exist")
    share_cpu_cores(processes)
    L.seed_everything(config.seed, workers=True, verbose=False)
    with speaking_if(processes.is_main):
        log.info(
            "precision: %s", choose_precision(config.precision, accelerator=config.accelerator)
        )
        if processes.world_size > 1:
            log.info("training processes: %d (%s)", processes.world_size, processes.strategy)
        # Nothing is written before the data and the split are known to train: a run
        # refused for them leaves no run directory.
        images, split = load_or_plan_split(config, run_dir, speaks=processes.is_main)
        check_batches_per_process(len(split.train), config=config, processes=processes)
        if processes.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, run_dir)
            save_new_split(run_dir, images, split, seed=config.seed)
        return train_and_finish(
            config, processes, run_dir, images, split, resume=resume, started=started
        )


def train_and_finish(
    config: FitConfig,
    processes: Processes,
    run_dir: Path,
    images: LabelledImages,
    split: Split,
    *,
    resume: bool,
    started: float,
) -> dict[str, Any] | None:
    """:func:`fit` from the split on, in each training process."""
    last_checkpoint = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    model = build_model(config, len(images.classes))
    datamodule = build_datamodule(config, images, split, model)
    with_probe = probes_the_head(config)
    recipe = build_recipe(
        config,
        images.subset(list(split.train)),
        freeze_epochs=0 if with_probe else config.freeze_epochs,
    )
    module = ClassifierModule(model, recipe.after_probe() if with_probe else recipe)
    # With --cache-features the frozen epochs run as a linear probe before Lightning
    # takes over, and the trainer only runs the unfrozen ones. The main process alone
    # changes the model before training: DDP starts the others from its weights.
    candidate, finish_seconds = None, 0.0
    if not resume and processes.is_main:
        datamodule.setup("fit")
        candidate = recalibrate_and_probe(config, model, datamodule, recipe, run_dir)
        if config.time_limit:  # one process only (devices.check_processes)
            elapsed = time.monotonic() - started
            config, finish_seconds = plan_to_time_limit(
                config, model, datamodule, recipe, elapsed=elapsed
            )
            save_config(config, run_dir)  # the epochs that will run, for --resume
    seconds_left = (
        config.time_limit - (time.monotonic() - started) - finish_seconds
        if config.time_limit
        else None
    )
    trainer, checkpoint = build_trainer(
        config, run_dir, processes, seconds_left=seconds_left, resume=resume,
        split_digest=split_digest(images, split),
    )  # fmt: skip
    # Loaded with weights_only: a checkpoint is plain data (training.module), never pickle.
    trainer.fit(
        compiled_for_training(module) if config.compile else module,
        datamodule=datamodule,
        ckpt_path=last_checkpoint if resume else None,
        weights_only=True,
    )
    if not processes.is_main:
        return None
    best = checkpoint.best_model_path or last_checkpoint
    summary = finish(module, best, datamodule, config, run_dir, candidate=candidate)
    finish_tracking(trainer.loggers, run_dir, summary)
    return summary


def finish(
    module: ClassifierModule,
    best_checkpoint: str | Path,
    datamodule: ImageDataModule,
    config: FitConfig,
    run_dir: Path,
    *,
    candidate: tuple[dict[str, torch.Tensor], ProbeResult] | None,
) -> dict[str, Any]:
    """After training, in the main process: the best weights (the probe's ``candidate``
    where they score better on val), calibrated, saved and reported."""
    model = load_best_checkpoint(module, best_checkpoint)
    val_logits, _ = collect_logits(model, datamodule.val_dataloader())
    if candidate is not None:
        val_logits = keep_the_better(model, val_logits, candidate, datamodule, config.monitor)
    return calibrate_save_and_report(model, datamodule, config, run_dir, val_logits=val_logits)


def probes_the_head(config: FitConfig) -> bool:
    """Whether the frozen epochs run as a linear probe on cached features."""
    return config.cache_features and config.freeze_epochs > 0


def freezes_in_trainer(config: FitConfig) -> bool:
    """Whether some parameters stop learning while Lightning trains: frozen epochs it runs
    itself, or stages frozen throughout."""
    return config.freeze_stages > 0 or (config.freeze_epochs > 0 and not probes_the_head(config))


def recalibrate_and_probe(
    config: FitConfig,
    model: ImageClassifier,
    datamodule: ImageDataModule,
    recipe: Recipe,
    run_dir: Path,
) -> tuple[dict[str, torch.Tensor], ProbeResult] | None:
    """Before fine-tuning: re-estimate BatchNorm statistics and, with ``--cache-features``,
    train the head as a linear probe. Returns the probe's weights and result, which
    compete with the fine-tuned model for the final choice."""
    if config.bn_recalibrate:
        recalibrate(model, datamodule, seed=config.seed)
    if not probes_the_head(config):
        return None
    result = linear_probe(model, datamodule, recipe, epochs=config.freeze_epochs, seed=config.seed)
    write_probe_history(run_dir, result.history)
    return {k: v.clone() for k, v in model.state_dict().items()}, result


def build_trainer(
    config: FitConfig,
    run_dir: Path,
    processes: Processes,
    *,
    seconds_left: float | None,
    resume: bool,
    split_digest: str,
) -> tuple[L.Trainer, ModelCheckpoint]:
    """The trainer for the epochs Lightning runs, and the callback that keeps the best
    checkpoint. ``seconds_left``: the time training may take (None: no limit);
    ``split_digest``: this process's split (``devices.split_digest``), checked to be every
    process's."""
    with_probe = probes_the_head(config)
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIR,
        filename=BEST_CHECKPOINT,
        monitor=f"val/{config.monitor}",
        mode=_MONITOR_MODE[config.monitor],
        save_last=True,
        enable_version_counter=False,
    )
    callbacks: list[L.Callback] = [
        checkpoint,
        EncoderFreeze(
            0 if with_probe else config.freeze_epochs,
            keep_bn_eval=config.keep_bn_eval,
            freeze_stages=config.freeze_stages,
        ),
        # On stderr: stdout carries the run's JSON summary, whatever it is piped to.
        RichProgressBar(console_kwargs={"stderr": True}),
        SameSplitEverywhere(split_digest),
    ]
    if config.ema_decay > 0:
        callbacks.append(WeightEMA(config.ema_decay))
    if config.early_stopping > 0:
        callbacks.append(
            EarlyStopping(
                monitor=f"val/{config.monitor}",
                mode=_MONITOR_MODE[config.monitor],
                patience=config.early_stopping,
            )
        )
    loggers = build_loggers(config, run_dir, resume=resume)
    trainer = L.Trainer(
        max_epochs=config.epochs - config.freeze_epochs if with_probe else config.epochs,
        # A backstop: a machine that slows down mid-run still stops in time to finish.
        max_time=timedelta(seconds=max(1.0, seconds_left)) if seconds_left is not None else None,
        **trainer_devices(config, strategy=processes.strategy),
        callbacks=callbacks,
        logger=loggers,
        deterministic=False,
        log_every_n_steps=1,
        enable_model_summary=False,
    )
    if processes.is_main and not resume:
        start_tracking(loggers, config, run_dir)
    return trainer, checkpoint


def load_best_checkpoint(module: ClassifierModule, path: str | Path) -> ImageClassifier:
    """``module``'s model, on the CPU, with the weights of the checkpoint at ``path``.

    The module's own model and recipe are passed in rather than rebuilt from the
    checkpoint's hyperparameters: a run resumed from a checkpoint without them still loads.
    """
    best = ClassifierModule.load_from_checkpoint(
        path, model=module.model, recipe=module.recipe, map_location="cpu", weights_only=True
    )
    return best.model.cpu()


def keep_the_better(
    model: ImageClassifier,
    val_logits: np.ndarray,
    probe: tuple[dict[str, torch.Tensor], ProbeResult],
    datamodule: ImageDataModule,
    monitor: str,
) -> np.ndarray:
    """Load the probe's weights into ``model`` if they score better on val than the
    fine-tuned ones (``val_logits``); return the val logits of the weights kept."""
    probe_state, result = probe
    probe_logits = result.val_logits.numpy()
    labels = np.array(datamodule.images_in("val").labels)
    classes = len(datamodule.images.classes)
    tuned, probed = (
        validation_score(logits, labels, monitor, classes) for logits in (val_logits, probe_logits)
    )
    log.info("val %s: fine-tuned %.4f, linear probe %.4f", monitor, tuned, probed)
    if probed <= tuned:
        return val_logits
    log.info("keeping the linear probe's model: fine-tuning did not beat it on val")
    model.load_state_dict(probe_state)
    return probe_logits


def plan_to_time_limit(
    config: FitConfig,
    model: ImageClassifier,
    datamodule: ImageDataModule,
    recipe: Recipe,
    *,
    elapsed: float,
) -> tuple[FitConfig, float]:
    """``config`` with as many epochs (at most ``config.epochs``) as fit in the time left,
    and the seconds to keep for finishing the run; see training/budget.py."""
    with_probe = probes_the_head(config)
    train_loader = datamodule.train_dataloader()
    precision = choose_precision(config.precision, accelerator=config.accelerator).precision
    plan = plan_epochs(
        seconds_left=config.time_limit - elapsed,
        train_step=time_train_step(
            model, train_loader, recipe, freeze_stages=config.freeze_stages, precision=precision
        ),
        eval_batch=time_eval_batch(model, datamodule.val_dataloader(), precision=precision),
        train_steps_per_epoch=len(train_loader),
        val_batches=len(datamodule.val_dataloader()),
        test_batches=len(datamodule.test_dataloader()),
        views=len(VIEW_SETS[config.tta]),
    )
    done = config.freeze_epochs if with_probe else 0
    epochs = min(config.epochs, done + plan.epochs)
    if epochs <= config.freeze_epochs:
        raise ValueError(
            f"--time-limit {config.time_limit:.0f} leaves no epoch after the "
            f"{config.freeze_epochs} frozen one(s): {plan.explanation()}"
        )
    log.info("time limit %.0f s, %.0f s used: %s; running %d of at most %d epochs",
             config.time_limit, elapsed, plan.explanation(), epochs, config.epochs)  # fmt: skip
    return replace(config, epochs=epochs), plan.finish_seconds


def recalibrate(model: ImageClassifier, datamodule: ImageDataModule, *, seed: int) -> None:
    """Re-estimate the encoder's BatchNorm statistics on a shuffled sample of training
    images in the eval view (see training/batchnorm.py)."""
    images = datamodule.eval_dataset("train")
    loader = DataLoader(
        images,
        batch_size=datamodule.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=datamodule.num_workers,
        drop_last=drops_last_batch(len(images), datamodule.batch_size),
    )
    start = time.perf_counter()
    seen = recalibrate_batchnorm(
        model.encoder, loader, max_batches=math.ceil(_RECALIBRATION_IMAGES / datamodule.batch_size)
    )
    if seen:
        log.info("BatchNorm statistics re-estimated on %d training images in %.1f s",
                 seen, time.perf_counter() - start)  # fmt: skip


def validation_score(
    logits: np.ndarray, labels: np.ndarray, monitor: str, num_classes: int
) -> float:
    """The monitored val metric, larger is better (negative NLL for ``loss``)."""
    if monitor == "loss":
        return -negative_log_likelihood(softmax(logits), labels)
    metrics = classification_metrics(labels, logits.argmax(axis=1), tuple(range(num_classes)))
    return metrics[monitor]


def calibrate_save_and_report(
    model: ImageClassifier,
    datamodule: ImageDataModule,
    config: FitConfig,
    run_dir: Path,
    *,
    val_logits: np.ndarray | None = None,
) -> dict[str, Any]:
    """Calibrate on val, save the model, and report on the test part if there is one.

    ``val_logits``: the model's single-view val logits when the caller has them already.
    With ``config.tta`` views, they get a temperature of their own and their figures go
    next to the single view's (a ``tta`` entry).
    """
    classes, views = datamodule.images.classes, config.tta
    if val_logits is None or views != "none":
        val_logits, val_labels = collect_view_logits(
            model, datamodule.val_dataloader(), views=views
        )
    else:
        val_logits, val_labels = val_logits[None], np.array(datamodule.images_in("val").labels)
    temperatures = fit_temperatures(val_logits, val_labels, views=views)
    val = evaluation_metrics_with_views(
        val_logits, val_labels, classes, views=views, temperatures=temperatures,
        binary_negative=config.binary_negative,
    )  # fmt: skip
    headline = (*_SUMMARY_KEYS, "tta")
    summary = {"val": {key: val[key] for key in headline if key in val}}
    save_trained_model(model, run_dir, metrics=summary["val"], temperatures=temperatures)
    if datamodule.split.test:
        test_logits, test_labels = collect_view_logits(
            model, datamodule.test_dataloader(), views=views
        )
        test = evaluation_metrics_with_views(
            test_logits, test_labels, classes, views=views, temperatures=temperatures,
            binary_negative=config.binary_negative,
        )  # fmt: skip
        report = write_report(
            run_dir, {"split": "test", **test}, logits=test_logits[0], labels=test_labels,
            paths=datamodule.images_in("test").paths, classes=classes,
            title=report_title(model=config.model, data_path=config.data, run_dir=config.out,
                               split="test"),
            history=read_history(run_dir), explainer=torch_explainer(model),
        )  # fmt: skip
        summary["test"] = {key: test[key] for key in headline if key in test}
        summary["report"] = str(report)
    return summary


def build_model(config: FitConfig, num_classes: int) -> ImageClassifier:
    model = create_model(
        config.model,
        num_classes,
        pretrained=config.pretrained,
        img_size=config.eval_img_size or config.img_size,
        crop_pct=config.crop_pct,
        crop_mode=config.crop_mode,
        head=HeadConfig(**config.head_kwargs()),
    )
    first_stages(model.encoder, config.freeze_stages)  # a bad count fails before any training
    # Channels-last convolution weights make every convolution run in NHWC, the layout
    # oneDNN (CPU) and tensor cores (GPU) are fastest in; docs/benchmarks.md measures it.
    # Saved weights are made contiguous again.
    return model.to(memory_format=torch.channels_last)


def build_datamodule(
    config: FitConfig, images: LabelledImages, split: Split, model: ImageClassifier
) -> ImageDataModule:
    return ImageDataModule(
        images,
        split,
        model.preprocessing,
        augmentation=Augmentation(**config.augmentation_kwargs()),
        train_size=(config.img_size, config.img_size) if config.img_size else None,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        cache_images=config.cache_images,
        seed=config.seed,
    )


def prepare_split(
    config: FitConfig, run_dir: Path, *, writes: bool = True
) -> tuple[LabelledImages, Split]:
    """:func:`load_or_plan_split`, and with ``writes`` the split saved as the run's.

    Without ``writes`` (a training process other than the main one) nothing is printed or
    saved: the split is the same deterministic one the main process saves."""
    images, split = load_or_plan_split(config, run_dir, speaks=writes)
    if writes:
        save_new_split(run_dir, images, split, seed=config.seed)
    return images, split


def load_or_plan_split(
    config: FitConfig, run_dir: Path, *, speaks: bool
) -> tuple[LabelledImages, Split]:
    """Load the dataset in its layout, check it (with ``speaks``, printing what was found;
    refusing bad files, leaks and conflicting copies unless allowed), and reuse the run's
    split or complete the one the data comes with. Writes nothing."""
    dataset = open_dataset(
        config.data,
        val_data=config.val_data,
        test_data=config.test_data,
        label_format=config.label_format(),
    )
    log.info("data: %s", dataset.layout)
    check = check_dataset(dataset.images, dataset.parts or None, progress=speaks)
    if speaks:
        print_check(check, sys.stderr)
    problems = check.problems(
        skip_bad_images=config.skip_bad_images, allow_duplicates=config.allow_duplicates
    )
    if problems:
        raise DatasetError("\n".join(problems))
    for warning in check.warnings():
        log.warning("warning: %s", warning)
    if check.bad_files:
        log.warning("skipping %d unreadable image(s)", len(check.bad_files))
    split_file = run_dir / SPLIT_FILE
    if split_file.is_file():
        images = dataset.without({bad.path for bad in check.bad_files}).images
        return images, load_split(split_file, images)
    usable, split = plan_split(
        dataset, check, val_fraction=config.val_fraction, test_fraction=config.test_fraction,
        seed=config.seed,
    )  # fmt: skip
    log.info("split: %s", ", ".join(f"{name} {len(split.indices(name))}" for name in PARTS))
    return usable.images, split


def save_new_split(run_dir: Path, images: LabelledImages, split: Split, *, seed: int) -> None:
    """Save ``split`` of ``images`` as the run's, unless the run has one already."""
    split_file = run_dir / SPLIT_FILE
    if split_file.is_file():
        return
    # Whole or not at all: other processes (torchrun, SLURM) may read it meanwhile.
    partial = split_file.with_suffix(".partial")
    save_split(partial, images, split, seed=seed)
    partial.replace(split_file)


def build_recipe(
    config: FitConfig, train_images: LabelledImages, *, freeze_epochs: int = 0
) -> Recipe:
    weights = None
    if config.class_weights == "auto":
        counts = np.bincount(train_images.labels, minlength=len(train_images.classes))
        weights = tuple(float(w) for w in len(train_images) / (len(counts) * counts))
    return Recipe(**config.recipe_kwargs(class_weights=weights, freeze_epochs=freeze_epochs))


def save_trained_model(
    model: ImageClassifier,
    run_dir: Path,
    *,
    metrics: dict,
    temperatures: dict[str, float],
) -> None:
    """The weights and their :class:`ModelDescription`, ``temperatures`` by view set.
    The class names are the split's (``data.splits.saved_classes``)."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, run_dir / MODEL_WEIGHTS)
    write_model_description(
        run_dir,
        ModelDescription(model.structure, temperatures=temperatures, val_metrics=metrics),
    )
