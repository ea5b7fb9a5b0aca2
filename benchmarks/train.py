"""Training benchmark: where the time of a fine-tuning run goes, against same-run baselines.

1. **Step throughput**: images/s of convtune's Lightning training step (its module,
   trainer settings, logger and progress bar) against a plain PyTorch loop doing the same
   forward, loss, backward, optimizer and schedule step on the same model, batches and
   initial weights: Lightning must not cost throughput.
2. **Data pipeline**: images/s of the training DataLoader (decode + albumentations, the
   configured workers), alone, against the model's training consumption from 1, so that
   the loader never starves the model.
3. **Frozen phase**: ``--freeze-epochs`` normal frozen epochs (augmented images through the
   frozen encoder every epoch, validation each epoch) against ``--cache-features``'s linear
   probe (features computed once), same data and seed: the speed-up and the validation
   accuracy of each. The probe's one encoder pass costs about as much as one
   normal epoch on torch, so the speed-up grows with the number of frozen epochs.
4. **Feature extraction** (``--parts features``, not run by default): the probe's one pass
   over the train and val images, on torch's eval-mode encoder against onnxruntime's
   (``training.probe.onnx_encoder``), the export counted: whether the export pays at this
   number of images, which ``training.probe.ONNX_MIN_IMAGES`` decides in a fit.

5. **Precision and compilation** (``--parts precision``, not run by default): images/s of
   the Lightning step in fp32 (today's), in bf16 autocast, and under ``torch.compile`` at
   the precision ``--precision auto`` picks on this CPU, on the same model, batches and
   initial weights. Compilation is timed apart (the first ``--skip-steps`` steps' excess
   over steady steps, with cold caches as in a first run) and amortised over an epoch of
   ``--epoch-images``. Whether bf16 pays depends on the CPU (training/devices.py), so the
   report carries the CPU's flags.

Everything runs on the CPU. Each measurement runs ``--rounds`` times, the order of the
compared runs alternating so that neither always meets a warmer machine; the table shows
medians, each ratio is the median of the per-round ratios, against its goal (``GOALS``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from convtune.benchmarks.cli import TRAIN_FIT_DEFAULTS, TRAIN_FIT_OPTIONS, TRAIN_MEASUREMENTS
from convtune.benchmarks.common import cpu_flags, median_of, write_report
from convtune.data.datamodule import ImageDataModule
from convtune.data.synthetic import make_shapes_dataset
from convtune.models.factory import ImageClassifier
from convtune.training.callbacks import EncoderFreeze
from convtune.training.compilation import compile_problem, compiled_for_training
from convtune.training.config import FitConfig, resolve_config
from convtune.training.devices import choose_precision
from convtune.training.fit import (
    build_datamodule,
    build_model,
    build_recipe,
    prepare_split,
    without_lightning_chatter,
)
from convtune.training.module import (
    ClassifierModule,
    Recipe,
    build_loss,
    build_optimizer,
    model_param_groups,
)
from convtune.training.probe import encode, linear_probe, onnx_encoder

GOALS = {  # the performance issue's goals, by ratio name
    "lightning_vs_plain": "Lightning step img/s ÷ plain-loop step img/s ≥ 0.95",
    "pipeline_vs_model": "data pipeline img/s ÷ model training img/s ≥ 2",
    "probe_speedup": "normal frozen epochs time ÷ cached-feature probe time ≥ 5",
    "onnx_encoding_speedup": "torch encoding time ÷ onnxruntime's, export counted: > 1 to pay",
    "bf16_vs_fp32": "bf16 autocast step img/s ÷ fp32 ≥ 1.5 (a CPU with native bf16)",
    "compile_vs_fp32": "compiled step img/s ÷ fp32, compile time left out",
    "compile_epoch_vs_fp32": "compiled step img/s ÷ fp32 over an epoch, compile time "
    "counted: > 1 to pay",
}
# The precision part's variants, fp32 first (the baseline): (Lightning precision or None
# for the one `--precision auto` picks on this CPU, torch.compile, the table's name).
PRECISION_VARIANTS: dict[str, tuple[str | None, bool, str]] = {
    "fp32": ("32-true", False, "fp32"),
    "bf16": ("bf16-mixed", False, "bf16 autocast"),
    "compile": (None, True, "compiled, auto precision"),
}


class StepTimer(L.Callback):
    """Wall time from the start of batch ``skip`` to the end of the last batch, and of the
    ``skip`` batches before it."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.first = self.started = self.ended = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.global_step == 0:
            self.first = time.perf_counter()
        if trainer.global_step == self.skip:
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        self.ended = time.perf_counter()
        self.steps = trainer.global_step - self.skip

    def step_seconds(self) -> float:
        """Seconds of one timed step."""
        return (self.ended - self.started) / self.steps

    def warmup_excess_seconds(self) -> float:
        """What the untimed steps took beyond as many timed ones: compilation, first-use
        set-up."""
        return (self.started - self.first) - self.skip * self.step_seconds()


def fixed_batches(model: ImageClassifier, *, batch_size: int, steps: int) -> DataLoader:
    """``steps`` batches of random pixels and labels, the same for every run."""
    generator = torch.Generator().manual_seed(0)
    height, width = model.preprocessing.input_size
    pixels = torch.randn(steps * batch_size, 3, height, width, generator=generator)
    labels = torch.randint(0, model.num_classes, (steps * batch_size,), generator=generator)
    return DataLoader(TensorDataset(pixels, labels), batch_size=batch_size)


def benchmark_trainer(
    workdir: Path,
    name: str,
    callbacks: list[L.Callback],
    *,
    precision: str = "auto",
    **settings: Any,
) -> L.Trainer:
    """convtune's trainer settings (training/fit.py) on the CPU, without checkpoints."""
    return L.Trainer(
        accelerator="cpu",
        precision=choose_precision(precision, accelerator="cpu").precision,
        # On stderr: stdout carries the table.
        callbacks=[*callbacks, RichProgressBar(console_kwargs={"stderr": True})],
        logger=CSVLogger(workdir, name=name),
        enable_checkpointing=False,
        enable_model_summary=False,
        **settings,
    )


def timed_lightning_epoch(
    model: ImageClassifier,
    recipe: Recipe,
    loader: DataLoader,
    *,
    skip: int,
    workdir: Path,
    precision: str = "auto",
    compile: bool = False,
) -> StepTimer:
    """One epoch of ``loader`` through convtune's Lightning step, timed; ``compile`` as
    ``convtune fit --compile``."""
    timer = StepTimer(skip)
    trainer = benchmark_trainer(
        workdir, "lightning", [timer], precision=precision, max_epochs=1, log_every_n_steps=1,
        limit_val_batches=0,
    )  # fmt: skip
    module = ClassifierModule(model, recipe)
    trainer.fit(compiled_for_training(module) if compile else module, train_dataloaders=loader)
    return timer


def lightning_images_per_s(
    model: ImageClassifier, recipe: Recipe, loader: DataLoader, *, skip: int, workdir: Path
) -> float:
    timer = timed_lightning_epoch(model, recipe, loader, skip=skip, workdir=workdir)
    return loader.batch_size / timer.step_seconds()


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


def step_throughput(
    config: FitConfig, workdir: Path, *, steps: int, skip: int, lightning_first: bool
) -> dict:
    model = build_model(config, num_classes=3)
    loader = fixed_batches(model, batch_size=config.batch_size, steps=steps + skip)
    recipe = Recipe(**config.recipe_kwargs())
    results = {}
    for runner in ("lightning", "plain") if lightning_first else ("plain", "lightning"):
        fresh = copy.deepcopy(model)  # both start from identical weights
        if runner == "lightning":
            results[runner] = lightning_images_per_s(
                fresh, recipe, loader, skip=skip, workdir=workdir
            )
        else:
            results[runner] = plain_images_per_s(fresh, recipe, loader, skip=skip)
    return {"lightning_images_per_s": results["lightning"], "plain_images_per_s": results["plain"]}


def precision_throughput(
    config: FitConfig,
    workdir: Path,
    *,
    variants: list[str],
    steps: int,
    skip: int,
    epoch_images: int,
    reverse: bool,
) -> dict:
    """Lightning step img/s of each of ``variants`` (:data:`PRECISION_VARIANTS`) on the same
    model, batches and initial weights; for the compiled one also its compile seconds (cold
    caches, as a first run pays them) and its img/s over an epoch of ``epoch_images``, the
    compile counted."""
    model = build_model(config, num_classes=3)
    loader = fixed_batches(model, batch_size=config.batch_size, steps=steps + skip)
    recipe = Recipe(**config.recipe_kwargs())
    results: dict[str, float] = {}
    for variant in reversed(variants) if reverse else variants:
        precision, compile, _ = PRECISION_VARIANTS[variant]
        with cold_compiler(workdir) if compile else contextlib.nullcontext():
            timer = timed_lightning_epoch(
                copy.deepcopy(model), recipe, loader, skip=skip, workdir=workdir,
                precision=precision or "auto", compile=compile,
            )  # fmt: skip
        results[f"{variant}_images_per_s"] = loader.batch_size / timer.step_seconds()
        if compile:
            compile_s = max(0.0, timer.warmup_excess_seconds())
            epoch_s = epoch_images * timer.step_seconds() / loader.batch_size + compile_s
            results["compile_s"] = compile_s
            results["compile_epoch_images_per_s"] = epoch_images / epoch_s
    # The machine's 1-minute load, this benchmark included: on a CPU shared with other
    # work, oneDNN's threads wait on one another and a step can take several times longer.
    results["load_average"] = os.getloadavg()[0]
    return results


@contextlib.contextmanager
def cold_compiler(workdir: Path) -> Iterator[None]:
    """torch.compile as on a first run: no graphs from earlier rounds, an empty inductor
    cache (generated code, built kernels) under ``workdir``."""
    from torch._inductor.utils import fresh_cache  # inductor's import alone takes seconds

    torch._dynamo.reset()
    with fresh_cache(dir=str(workdir)):
        yield


def precision_ratios(results: dict[str, float]) -> dict[str, float]:
    """Each variant's img/s (the compiled one's also over an epoch) ÷ fp32's."""
    fp32 = results["fp32_images_per_s"]
    names = [
        name for name in ("bf16", "compile", "compile_epoch") if f"{name}_images_per_s" in results
    ]
    return {f"{name}_vs_fp32": results[f"{name}_images_per_s"] / fp32 for name in names}


def parse_variants(text: str) -> list[str]:
    """``--variants``: known names, fp32 (the baseline) among them, in the table's order."""
    named = {name.strip() for name in text.split(",") if name.strip()}
    if "fp32" not in named or named - set(PRECISION_VARIANTS):
        raise ValueError(
            f"--variants takes fp32 and any of {', '.join(list(PRECISION_VARIANTS)[1:])}, "
            f"comma-separated; got {text!r}"
        )
    return [name for name in PRECISION_VARIANTS if name in named]


def prepared_data(config: FitConfig, workdir: Path) -> tuple[ImageDataModule, Recipe]:
    """The datamodule (set up: any image cache filled) and recipe, as fit makes them."""
    run_dir = workdir / f"run-{config.seed}"
    run_dir.mkdir(exist_ok=True)
    images, split = prepare_split(config, run_dir)
    datamodule = build_datamodule(config, images, split, build_model(config, len(images.classes)))
    datamodule.setup("fit")
    return datamodule, build_recipe(config, images.subset(list(split.train)))


def pipeline_throughput(config: FitConfig, workdir: Path, *, min_batches: int) -> dict:
    """The train loader alone: first-batch time (worker start-up), then images/s."""
    datamodule, _ = prepared_data(config, workdir)
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


def frozen_phase(config: FitConfig, workdir: Path, *, probe_first: bool) -> dict:
    """Normal frozen epochs against the cached-feature probe: seconds and val accuracy.

    Both start from the same seed, split and initial head; any image cache is filled
    before the clock starts.
    """
    epochs = config.freeze_epochs
    datamodule, recipe = prepared_data(config, workdir)
    results = {}
    for mode in ("probe", "normal") if probe_first else ("normal", "probe"):
        L.seed_everything(config.seed, workers=True, verbose=False)  # the same initial head
        model = build_model(config, len(datamodule.images.classes))
        started = time.perf_counter()
        if mode == "probe":
            result = linear_probe(model, datamodule, recipe, epochs=epochs, seed=config.seed)
            accuracy = result.history[-1]["val_accuracy"]
        else:
            trainer = benchmark_trainer(
                workdir, "frozen", [EncoderFreeze(epochs)], max_epochs=epochs,
                num_sanity_val_steps=0,
            )  # fmt: skip
            trainer.fit(ClassifierModule(model, recipe), datamodule=datamodule)
            accuracy = float(trainer.callback_metrics["val/accuracy"])
        results[f"{mode}_s"] = time.perf_counter() - started
        results[f"{mode}_val_accuracy"] = accuracy
    return results


def feature_extraction(config: FitConfig, workdir: Path, *, onnx_first: bool) -> dict:
    """The probe's encoding of the train and val images on torch and on onnxruntime, the
    export (timed apart too) counted in onnxruntime's; any image cache is filled before.
    The first round's export is the cold one a fit pays; later rounds reuse its imports."""
    datamodule, _ = prepared_data(config, workdir)
    model = build_model(config, len(datamodule.images.classes))
    model.encoder.eval()
    loaders = [datamodule.eval_loader("train"), datamodule.eval_loader("val")]
    results: dict[str, float] = {"images": sum(len(loader.dataset) for loader in loaders)}
    for mode in ("onnxruntime", "torch") if onnx_first else ("torch", "onnxruntime"):
        started = time.perf_counter()
        encoder = model.encoder
        if mode == "onnxruntime":
            encoder = onnx_encoder(model)
            if encoder is None:
                raise RuntimeError("the encoder's ONNX export failed (logged above)")
            results["export_s"] = time.perf_counter() - started
        for loader in loaders:
            encode(encoder, loader)
        results[f"{mode}_s"] = time.perf_counter() - started
    results["load_average"] = os.getloadavg()[0]
    return results


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        measurement: {key: median_of(rounds, measurement, key) for key in figures}
        for measurement, figures in rounds[0].items()
    }


def precision_rows(precision: dict[str, float], *, epoch_images: int) -> list[tuple[str, float]]:
    rows = [
        (f"training step, {name} (img/s)", precision[f"{variant}_images_per_s"])
        for variant, (_, _, name) in PRECISION_VARIANTS.items()
        if f"{variant}_images_per_s" in precision
    ]
    if "compile_s" in precision:
        rows += [
            ("  compile time, cold caches (s)", precision["compile_s"]),
            (f"  over an epoch of {epoch_images} images (img/s)",
             precision["compile_epoch_images_per_s"]),
        ]  # fmt: skip
    return [*rows, ("load average, 1 min, at the end", precision["load_average"])]


def format_table(summary: dict[str, Any], config: FitConfig, args: argparse.Namespace) -> str:
    rows: list[tuple[str, float]] = []
    if steps := summary.get("steps"):
        rows += [
            ("training step, Lightning (img/s)", steps["lightning_images_per_s"]),
            ("training step, plain loop (img/s)", steps["plain_images_per_s"]),
        ]
    if pipeline := summary.get("pipeline"):
        rows += [
            (f"data pipeline, {config.num_workers} workers (img/s)", pipeline["images_per_s"]),
            ("data pipeline, first batch (s)", pipeline["first_batch_s"]),
        ]
    if frozen := summary.get("frozen"):
        epochs = config.freeze_epochs
        rows += [
            (f"{epochs} frozen epochs, normal (s)", frozen["normal_s"]),
            ("  val accuracy", frozen["normal_val_accuracy"]),
            (f"{epochs} frozen epochs, cached features (s)", frozen["probe_s"]),
            ("  val accuracy", frozen["probe_val_accuracy"]),
        ]
    if features := summary.get("features"):
        rows += [
            (f"encoding {features['images']:.0f} images, torch (s)", features["torch_s"]),
            ("  on onnxruntime, export included (s)", features["onnxruntime_s"]),
            ("  of which the export (s)", features["export_s"]),
            ("  load average, 1 min, at the end", features["load_average"]),
        ]
    if precision := summary.get("precision"):
        rows += precision_rows(precision, epoch_images=args.epoch_images)
    lines = [f"{name:<44}{value:>10.3f}" for name, value in rows]
    if precision:
        auto = choose_precision("auto", accelerator="cpu")
        lines.append(f"CPU flags: {', '.join(cpu_flags())}; --precision auto: {auto}")
    lines.append("")
    lines += [f"{value:>8.2f}  {GOALS[key]}" for key, value in summary["ratios"].items()]
    return "\n".join(lines)


def benchmark_config(args: argparse.Namespace, shapes: Path, seed: int) -> FitConfig:
    """The fit configuration to benchmark: defaults < --config < explicit options."""
    from_file = {} if args.config is None else yaml.safe_load(args.config.read_text()) or {}
    overrides: dict[str, Any] = {"out": str(shapes.parent), "seed": seed}
    flagged = [field for _, field, _, _ in TRAIN_FIT_OPTIONS] + ["data"]
    for field in flagged:
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
        elif field not in from_file and field in TRAIN_FIT_DEFAULTS:
            overrides[field] = TRAIN_FIT_DEFAULTS[field]
    if "data" not in overrides and "data" not in from_file:
        overrides["data"] = str(shapes)
    config = resolve_config(args.config, overrides)
    if config.freeze_epochs < 1:
        raise ValueError("the frozen-phase comparison needs --freeze-epochs ≥ 1")
    return config


def run_round(
    config: FitConfig, workdir: Path, parts: set[str], args: argparse.Namespace, alternate: bool
) -> dict[str, Any]:
    """One round of the measurements in ``parts``; ``alternate`` swaps each pair's order."""
    one_round: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    if "steps" in parts:
        steps = step_throughput(
            config, workdir, steps=args.steps, skip=args.skip_steps, lightning_first=alternate
        )
        one_round["steps"] = steps
        ratios["lightning_vs_plain"] = steps["lightning_images_per_s"] / steps["plain_images_per_s"]
    if "pipeline" in parts:
        pipeline = pipeline_throughput(config, workdir, min_batches=args.pipeline_batches)
        one_round["pipeline"] = pipeline
        if "steps" in parts:
            ratios["pipeline_vs_model"] = (
                pipeline["images_per_s"] / one_round["steps"]["lightning_images_per_s"]
            )
    if "frozen" in parts:
        frozen = frozen_phase(config, workdir, probe_first=alternate)
        one_round["frozen"] = frozen
        ratios["probe_speedup"] = frozen["normal_s"] / frozen["probe_s"]
    if "features" in parts:
        features = feature_extraction(config, workdir, onnx_first=alternate)
        one_round["features"] = features
        ratios["onnx_encoding_speedup"] = features["torch_s"] / features["onnxruntime_s"]
    if "precision" in parts:
        precision = precision_throughput(
            config, workdir, variants=parse_variants(args.variants), steps=args.steps,
            skip=args.skip_steps, epoch_images=args.epoch_images, reverse=alternate,
        )  # fmt: skip
        one_round["precision"] = precision
        ratios.update(precision_ratios(precision))
    one_round["ratios"] = ratios
    return one_round


def run(args: argparse.Namespace) -> int:
    """``convtune bench train`` with the options :mod:`convtune.benchmarks.cli` parsed."""
    parts = {part.strip() for part in args.parts.split(",")}
    if not parts or parts - set(TRAIN_MEASUREMENTS):
        raise ValueError(
            f"--parts takes a comma-separated subset of {', '.join(TRAIN_MEASUREMENTS)}"
        )
    counts = (args.steps, args.rounds, args.pipeline_batches, args.per_class, args.epoch_images)
    if min(counts) < 1:
        raise ValueError(
            "--steps, --rounds, --pipeline-batches, --per-class and --epoch-images must be ≥ 1"
        )
    compiles = "precision" in parts and "compile" in parse_variants(args.variants)
    if compiles and (problem := compile_problem(on_cpu=True)):
        raise ValueError(f"--variants compile: {problem}")
    rounds = []
    with (
        without_lightning_chatter(),
        tempfile.TemporaryDirectory(prefix="convtune-bench-train-") as workdir_name,
    ):
        workdir = Path(workdir_name)
        shapes = workdir / "shapes"
        for number in range(args.rounds):
            # Another seed each round: another split and head init, so the accuracies
            # show the noise that the comparison must be judged against.
            config = benchmark_config(args, shapes, seed=number)
            if config.data == str(shapes) and not shapes.exists():
                make_shapes_dataset(shapes, per_class=args.per_class, size=300)
            print(f"round {number + 1}/{args.rounds}", file=sys.stderr)
            rounds.append(run_round(config, workdir, parts, args, alternate=number % 2 == 0))
            ratios = rounds[-1]["ratios"].items()
            print(
                "  " + ", ".join(f"{name} {value:.3f}" for name, value in ratios), file=sys.stderr
            )
    summary = summarise(rounds)
    print(format_table(summary, config, args))
    if args.json:
        write_report(args.json, "train", vars(args), summary, rounds)
    return 0
