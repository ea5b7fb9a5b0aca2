"""Training benchmark: where the time of a fine-tuning run goes, against same-run baselines.

1. **Step throughput**: images/s of convtune's Lightning training step (its module,
   trainer settings, logger and progress bar) against a plain PyTorch loop doing the same
   forward, loss, backward, optimizer and schedule step on the same model, batches and
   initial weights. The goal is a ratio ≥ 0.95: Lightning must not cost throughput.
2. **Data pipeline**: images/s of the training DataLoader (decode + albumentations, the
   configured workers), alone, against the model's training consumption from 1: ≥ 2×, so
   the loader never starves the model.
3. **Frozen phase**: ``--freeze-epochs`` normal frozen epochs (augmented images through the
   frozen encoder every epoch, validation each epoch) against ``--cache-features``'s linear
   probe (features computed once), same data and seed: the speed-up (goal ≥ 5×) and the
   validation accuracy of each.

Every part runs ``--rounds`` times (the order of the compared runs alternates); the table
shows medians, each ratio is the median of the per-round ratios. Run as
``convtune bench train`` or ``python -m benchmarks.train``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import median_of, write_report
from data.datamodule import ImageDataModule
from data.sources import load_labelled_images
from data.splits import stratified_split
from data.synthetic import make_shapes_dataset
from models.factory import ImageClassifier, create_model
from training.callbacks import EncoderFreeze
from training.fit import resolve_precision
from training.module import (
    ClassifierModule,
    Recipe,
    build_loss,
    build_optimizer,
    model_param_groups,
)
from training.probe import linear_probe

GOALS = {  # the performance issue's goals, by ratio name
    "lightning_vs_plain": "Lightning step img/s ÷ plain-loop step img/s ≥ 0.95",
    "pipeline_vs_model": "data pipeline img/s ÷ model training img/s ≥ 2",
    "probe_speedup": "normal frozen epochs time ÷ cached-feature probe time ≥ 5",
}


@dataclass(frozen=True)
class Setup:
    """What every part trains: one architecture, size, batch and dataset."""

    model: str
    pretrained: str
    img_size: int | None
    batch_size: int
    num_workers: int
    data: Path
    workdir: Path


class StepTimer(L.Callback):
    """Wall time from the start of batch ``skip`` to the end of the last batch."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.started = self.ended = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.global_step == self.skip:
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        self.ended = time.perf_counter()
        self.steps = trainer.global_step - self.skip


def fixed_batches(model: ImageClassifier, *, batch_size: int, steps: int) -> DataLoader:
    """``steps`` batches of random pixels and labels, the same for every run."""
    generator = torch.Generator().manual_seed(0)
    height, width = model.preprocessing.input_size
    pixels = torch.randn(steps * batch_size, 3, height, width, generator=generator)
    labels = torch.randint(0, model.num_classes, (steps * batch_size,), generator=generator)
    return DataLoader(TensorDataset(pixels, labels), batch_size=batch_size)


def lightning_images_per_s(
    model: ImageClassifier, recipe: Recipe, loader: DataLoader, *, skip: int, workdir: Path
) -> float:
    """convtune's trainer settings (training/fit.py), minus validation and checkpoints."""
    timer = StepTimer(skip)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        precision=resolve_precision("auto"),
        callbacks=[timer, RichProgressBar()],
        logger=CSVLogger(workdir, name="lightning"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(ClassifierModule(model, recipe), train_dataloaders=loader)
    return timer.steps * loader.batch_size / (timer.ended - timer.started)


def plain_images_per_s(
    model: ImageClassifier, recipe: Recipe, loader: DataLoader, *, skip: int
) -> float:
    """The same step written by hand: forward, loss, zero_grad, backward, step, schedule."""
    model.train()
    loss_fn = build_loss(recipe)
    optimizer, schedule = build_optimizer(
        model_param_groups(model, recipe), recipe, total_steps=len(loader), warmup_steps=0
    )
    started = 0.0
    for index, (pixels, labels) in enumerate(loader):
        if index == skip:
            started = time.perf_counter()
        loss = loss_fn(model(pixels), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return (len(loader) - skip) * loader.batch_size / (time.perf_counter() - started)


def step_throughput(setup: Setup, *, steps: int, skip: int, lightning_first: bool) -> dict:
    model = build_model(setup, num_classes=3)
    loader = fixed_batches(model, batch_size=setup.batch_size, steps=steps + skip)
    recipe = Recipe()
    results = {}
    for runner in ("lightning", "plain") if lightning_first else ("plain", "lightning"):
        fresh = copy.deepcopy(model)  # both start from identical weights
        if runner == "lightning":
            results[runner] = lightning_images_per_s(
                fresh, recipe, loader, skip=skip, workdir=setup.workdir
            )
        else:
            results[runner] = plain_images_per_s(fresh, recipe, loader, skip=skip)
    return {"lightning_images_per_s": results["lightning"], "plain_images_per_s": results["plain"]}


def build_model(setup: Setup, *, num_classes: int) -> ImageClassifier:
    return create_model(
        setup.model, num_classes, pretrained=setup.pretrained, img_size=setup.img_size
    )


def build_datamodule(setup: Setup, model: ImageClassifier, *, seed: int) -> ImageDataModule:
    images = load_labelled_images(setup.data)
    split = stratified_split(
        images.labels, images.classes, val_fraction=0.2, test_fraction=0.0, seed=seed
    )
    return ImageDataModule(
        images,
        split,
        model.preprocessing,
        batch_size=setup.batch_size,
        num_workers=setup.num_workers,
        seed=seed,
    )


def pipeline_throughput(setup: Setup, *, min_batches: int) -> dict:
    """The train loader alone: first-batch time (worker start-up), then images/s."""
    model = build_model(setup, num_classes=3)
    datamodule = build_datamodule(setup, model, seed=0)
    loader = datamodule.train_dataloader()
    started = time.perf_counter()
    first_batch_s = None
    images = batches = 0
    while batches < min_batches:
        for pixels, _ in loader:
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - started
                started = time.perf_counter()
                continue
            images += len(pixels)
            batches += 1
    elapsed = time.perf_counter() - started
    return {"first_batch_s": first_batch_s, "images_per_s": images / elapsed}


def frozen_phase(setup: Setup, *, epochs: int, seed: int, probe_first: bool) -> dict:
    """Normal frozen epochs against the cached-feature probe: seconds and val accuracy."""
    results = {}
    for mode in ("probe", "normal") if probe_first else ("normal", "probe"):
        L.seed_everything(seed, workers=True, verbose=False)
        classes = len(load_labelled_images(setup.data).classes)
        model = build_model(setup, num_classes=classes)
        datamodule = build_datamodule(setup, model, seed=seed)
        recipe = Recipe()
        started = time.perf_counter()
        if mode == "probe":
            datamodule.setup("fit")
            accuracy = linear_probe(model, datamodule, recipe, epochs=epochs, seed=seed)
        else:
            trainer = L.Trainer(
                max_epochs=epochs,
                accelerator="cpu",
                precision=resolve_precision("auto"),
                callbacks=[EncoderFreeze(epochs), RichProgressBar()],
                logger=CSVLogger(setup.workdir, name="frozen"),
                enable_checkpointing=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
            )
            trainer.fit(ClassifierModule(model, recipe), datamodule=datamodule)
            accuracy = float(trainer.callback_metrics["val/accuracy"])
        results[f"{mode}_s"] = time.perf_counter() - started
        results[f"{mode}_val_accuracy"] = accuracy
    return results


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        part: {key: median_of(rounds, part, key) for key in rounds[0][part]} for part in rounds[0]
    }


def format_table(summary: dict[str, Any], *, setup: Setup, epochs: int) -> str:
    steps, pipeline, frozen = summary["steps"], summary["pipeline"], summary["frozen"]
    ratios = summary["ratios"]
    rows = [
        ("training step, Lightning (img/s)", steps["lightning_images_per_s"]),
        ("training step, plain loop (img/s)", steps["plain_images_per_s"]),
        (f"data pipeline, {setup.num_workers} workers (img/s)", pipeline["images_per_s"]),
        ("data pipeline, first batch (s)", pipeline["first_batch_s"]),
        (f"{epochs} frozen epochs, normal (s)", frozen["normal_s"]),
        ("  val accuracy", frozen["normal_val_accuracy"]),
        (f"{epochs} frozen epochs, cached features (s)", frozen["probe_s"]),
        ("  val accuracy", frozen["probe_val_accuracy"]),
    ]
    lines = [f"{name:<44}{value:>10.3f}" for name, value in rows]
    lines.append("")
    lines += [f"{ratios[key]:>8.2f}  {text}" for key, text in GOALS.items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convtune bench train",
        description="Benchmark training: Lightning against a plain loop, the data pipeline "
        "against the model, and the cached-feature probe against normal frozen epochs.",
    )
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="timm architecture")
    parser.add_argument(
        "--pretrained", default="auto", help="encoder weights, as for convtune fit [auto]"
    )
    parser.add_argument("--img-size", type=int, help="input size [the model's own]")
    parser.add_argument("--batch-size", type=int, default=16, help="[16]")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers [2]")
    parser.add_argument(
        "--data", type=Path, help="folder-per-class images [generated 300×300 shapes]"
    )
    parser.add_argument("--per-class", type=int, default=64, help="generated images per class")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps [8]")
    parser.add_argument("--skip-steps", type=int, default=2, help="untimed steps first [2]")
    parser.add_argument("--pipeline-batches", type=int, default=20, help="timed batches [20]")
    parser.add_argument("--freeze-epochs", type=int, default=5, help="frozen epochs [5]")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions, medians taken [3]")
    parser.add_argument("--json", type=Path, help="write the rounds and medians here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.steps, args.rounds, args.freeze_epochs, args.pipeline_batches) < 1:
        raise ValueError("--steps, --rounds, --freeze-epochs and --pipeline-batches must be ≥ 1")
    logging.getLogger("lightning").setLevel(logging.WARNING)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="convtune-bench-train-") as workdir_name:
        workdir = Path(workdir_name)
        data = args.data or make_shapes_dataset(
            workdir / "shapes", per_class=args.per_class, size=300
        )
        setup = Setup(args.model, args.pretrained, args.img_size, args.batch_size,
                      args.num_workers, data, workdir)  # fmt: skip
        for number in range(args.rounds):
            print(f"round {number + 1}/{args.rounds}", file=sys.stderr)
            alternate = number % 2 == 0
            one_round = {
                "steps": step_throughput(
                    setup, steps=args.steps, skip=args.skip_steps, lightning_first=alternate
                ),
                "pipeline": pipeline_throughput(setup, min_batches=args.pipeline_batches),
                "frozen": frozen_phase(
                    setup, epochs=args.freeze_epochs, seed=number, probe_first=alternate
                ),
            }
            steps, frozen = one_round["steps"], one_round["frozen"]
            one_round["ratios"] = {
                "lightning_vs_plain": steps["lightning_images_per_s"] / steps["plain_images_per_s"],
                "pipeline_vs_model": one_round["pipeline"]["images_per_s"]
                / steps["lightning_images_per_s"],
                "probe_speedup": frozen["normal_s"] / frozen["probe_s"],
            }
            rounds.append(one_round)
    summary = summarise(rounds)
    print(format_table(summary, setup=setup, epochs=args.freeze_epochs))
    if args.json:
        write_report(args.json, "train", vars(args), summary, rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
