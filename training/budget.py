"""Plan a run to a wall-clock budget (``--time-limit``), as AutoGluon's ``time_limit``.

Machines differ several times over in speed, so a fixed epoch count is a different run on
each. Instead, once the data is ready and the frozen phase has run, time a few real
training steps and a few evaluation batches on this machine, then give fine-tuning as
many epochs as fit in what is left, keeping back what the final evaluation, calibration
and report will take. The cosine schedule is planned for that many epochs, so the run
ends on a finished schedule rather than being cut off mid-way; Lightning's ``max_time``
still stops it at the limit if a machine slows down during the run.
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from convtune.models.factory import ImageClassifier, first_stages
from convtune.training.callbacks import hold_frozen
from convtune.training.module import Recipe, build_loss

# Fixed costs of finishing a run beyond the model's own forward passes: fitting the
# temperature, writing weights and the report.
FINISH_SECONDS = 15.0
# The timed steps leave out what Lightning's loop adds to each (logging, the progress
# bar, averaging the weights), so epochs are planned for this share of the time left,
# and each epoch also pays for starting its loops and writing checkpoints.
PLANNED_SHARE = 0.9
EPOCH_OVERHEAD_SECONDS = 0.5


@dataclass(frozen=True)
class EpochPlan:
    """The fine-tuning epochs that fit the time left, and the timings (seconds) behind them."""

    epochs: int
    seconds_left: float
    train_step: float
    eval_batch: float
    epoch_seconds: float
    finish_seconds: float

    def explanation(self) -> str:
        """How the plan came about, for the log and for an error that refuses it."""
        return (
            f"{self.seconds_left:.0f} s left: a training step takes {self.train_step:.2f} s, "
            f"an eval batch {self.eval_batch:.2f} s, so an epoch {self.epoch_seconds:.0f} s "
            f"and finishing {self.finish_seconds:.0f} s: {self.epochs} epoch(s) planned"
        )


def lightning_autocast(precision: str) -> AbstractContextManager:
    """The autocast Lightning runs a CPU step in at ``precision`` (its ``MixedPrecision``
    plugin's), so that a step is timed as it will run."""
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    return nullcontext()


def time_train_step(
    model: ImageClassifier,
    loader: DataLoader,
    recipe: Recipe,
    *,
    freeze_stages: int = 0,
    precision: str = "32-true",
    steps: int = 3,
) -> float:
    """Median seconds of one step (loading the batch, forward, backward, SGD) on a copy of
    ``model`` (after one untimed step), the encoder training as in fine-tuning, its first
    ``freeze_stages`` stages frozen, at Lightning's ``precision``."""
    trial = copy.deepcopy(model).train()
    trial.requires_grad_(True)
    hold_frozen(first_stages(trial.encoder, freeze_stages), train=False)
    loss_fn = build_loss(recipe)
    optimizer = torch.optim.SGD(trial.parameters(), lr=0.0, momentum=recipe.momentum)
    batches = itertools.cycle(loader)
    timings = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        pixels, labels = next(batches)
        with lightning_autocast(precision):
            loss = loss_fn(trial(pixels), torch.as_tensor(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings[1:])


@torch.no_grad()
def time_eval_batch(
    model: ImageClassifier, loader: DataLoader, *, precision: str = "32-true", batches: int = 2
) -> float:
    """Median seconds of loading a batch of ``loader`` and an eval-mode forward pass at
    Lightning's ``precision``."""
    was_training = model.training
    model.eval()
    timings = []
    loaded = itertools.cycle(loader)
    for _ in range(batches + 1):
        start = time.perf_counter()
        pixels, _ = next(loaded)
        with lightning_autocast(precision):
            model(pixels)
        timings.append(time.perf_counter() - start)
    model.train(was_training)
    return statistics.median(timings[1:])


def plan_epochs(
    *,
    seconds_left: float,
    train_step: float,
    eval_batch: float,
    train_steps_per_epoch: int,
    val_batches: int,
    test_batches: int,
    views: int = 1,
) -> EpochPlan:
    """As many epochs (each: its training steps, then validation) as fit in
    ``seconds_left`` after the final val and test passes (of each of ``views`` test-time
    views) and :data:`FINISH_SECONDS`."""
    epoch_seconds = (
        train_step * train_steps_per_epoch + eval_batch * val_batches + EPOCH_OVERHEAD_SECONDS
    )
    finish_seconds = eval_batch * (val_batches + test_batches) * views + FINISH_SECONDS
    epochs = math.floor((PLANNED_SHARE * seconds_left - finish_seconds) / epoch_seconds)
    if epochs < 1:
        raise ValueError(
            f"the time limit leaves {seconds_left:.0f} s for fine-tuning, but one epoch and "
            f"the final evaluation need about {epoch_seconds + finish_seconds:.0f} s on this "
            "machine: raise --time-limit, or lower --img-size or the data"
        )
    return EpochPlan(
        epochs=epochs,
        seconds_left=seconds_left,
        train_step=train_step,
        eval_batch=eval_batch,
        epoch_seconds=epoch_seconds,
        finish_seconds=finish_seconds,
    )
