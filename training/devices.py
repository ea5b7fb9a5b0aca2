"""Where a run trains: Lightning's accelerator, devices, strategy and nodes, checked before
any work, and which of the processes that train one run speaks and writes for it.

Under a multi-process strategy every process runs ``convtune fit`` from the top: Lightning's
``ddp`` starts the command again once per further device (its subprocess launcher), and
torchrun and SLURM start one process per device themselves. ``ddp_spawn`` would run
everything around training once, but it cannot serve torchrun or SLURM, so fit has one
design for every launcher: each process takes the same deterministic steps (the same
split, the same initial model) and only the process of global rank 0 prints, writes the
run directory, and does what comes after training. DDP starts every process from rank
0's weights and buffers, so what rank 0 alone does to the model before training (BatchNorm
re-estimation, the linear probe) reaches them all.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import StrategyRegistry

from convtune.data.datamodule import train_batches_per_process
from convtune.data.datasets import LabelledImages
from convtune.data.splits import PARTS, Split
from convtune.training.compilation import compile_problem
from convtune.training.config import FitConfig

# DDP waits for a gradient of every parameter it was given; a parameter frozen after it
# started (the frozen epochs, --freeze-stages) must be reported unused instead.
_FIND_UNUSED = "_find_unused_parameters_true"


@dataclass(frozen=True)
class Processes:
    """This process's place among those that train the run, and the strategy they use."""

    rank: int  # global
    world_size: int
    per_node: int
    on_cpu: bool
    strategy: str

    @property
    def is_main(self) -> bool:
        """The process that prints, writes the run directory and finishes the run."""
        return self.rank == 0


# CPU features that compute in bf16 natively, as torch.cpu.get_capabilities() and
# /proc/cpuinfo name them: AVX-512 BF16 (Cooper Lake, Zen 4 and later) and AMX (Sapphire
# Rapids and later). Without them oneDNN emulates bf16 through fp32, slower than fp32 itself.
NATIVE_BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run trains in (Lightning's name for it), and why."""

    precision: str
    reason: str

    def __str__(self) -> str:
        return f"{self.precision} ({self.reason})"


def cpu_precision(capabilities: Mapping[str, Any]) -> PrecisionChoice:
    """``auto`` on a CPU with these ``capabilities`` (``torch.cpu.get_capabilities()``):
    bf16 autocast where the CPU computes bf16 natively, fp32 elsewhere."""
    native = [feature for feature in NATIVE_BF16_CPU_FEATURES if capabilities.get(feature)]
    if native:
        return PrecisionChoice("bf16-mixed", f"this CPU has native bf16: {', '.join(native)}")
    return PrecisionChoice("32-true", "this CPU has no native bf16")


def choose_precision(precision: str, *, accelerator: str) -> PrecisionChoice:
    """``--precision`` as Lightning takes it. ``auto``: bf16 mixed precision on GPUs that
    support it, fp16 mixed on other GPUs, :func:`cpu_precision` on the CPU, fp32 elsewhere."""
    if precision != "auto":
        return PrecisionChoice(precision, "set by --precision")
    kind = accelerator
    if accelerator in ("auto", "gpu"):  # Lightning's order: CUDA, then MPS, then the CPU
        if torch.cuda.is_available():
            kind = "cuda"
        elif torch.backends.mps.is_available():
            kind = "mps"
        elif accelerator == "auto":
            kind = "cpu"
    if kind == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16-mixed", "this GPU supports bf16")
        return PrecisionChoice("16-mixed", "this GPU has no bf16")
    if kind == "cpu":
        return cpu_precision(torch.cpu.get_capabilities())
    return PrecisionChoice("32-true", f"no mixed precision chosen for {kind}")


def trainer_devices(config: FitConfig, *, strategy: str) -> dict[str, Any]:
    """``lightning.Trainer``'s device settings for ``config``, with ``strategy``
    (:attr:`Processes.strategy`)."""
    return {
        "accelerator": config.accelerator,
        "devices": config.devices,
        "strategy": strategy,
        "num_nodes": config.num_nodes,
        "precision": choose_precision(config.precision, accelerator=config.accelerator).precision,
    }


def plan_processes(config: FitConfig, *, freezes_parameters: bool) -> Processes:
    """This process's place in the run, asking Lightning as the trainer will (it reads
    torchrun's, SLURM's and its own launcher's variables). A setting this machine cannot
    run is a ValueError saying what to change, raised before any work.

    ``freezes_parameters``: some parameters stop learning while the trainer runs, which
    DDP must be told (``_FIND_UNUSED``)."""
    settings = trainer_devices(config, strategy=config.strategy)
    try:
        trainer = L.Trainer(
            **settings, logger=False, enable_checkpointing=False, enable_progress_bar=False
        )
    except (ValueError, TypeError, MisconfigurationException) as error:
        shown = " ".join(f"--{name.replace('_', '-')} {settings[name]}" for name in settings)
        raise ValueError(f"cannot train with {shown}: {error}") from error
    strategy = "ddp" if config.strategy == "auto" and trainer.world_size > 1 else config.strategy
    if freezes_parameters and strategy + _FIND_UNUSED in StrategyRegistry:
        strategy += _FIND_UNUSED
    processes = Processes(
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        per_node=trainer.num_devices,
        on_cpu=isinstance(trainer.accelerator, CPUAccelerator),
        strategy=strategy,
    )
    check_processes(config, processes)
    return processes


def check_processes(config: FitConfig, processes: Processes) -> None:
    """Refuse what Lightning would start but cannot go well here."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if processes.on_cpu and processes.per_node > (cores or 1):
        raise ValueError(
            f"--devices {config.devices} on the CPU starts {processes.per_node} training "
            f"processes, more than this machine's {cores} cores: use --devices {cores} or "
            "fewer, or --accelerator gpu on a machine with GPUs"
        )
    if config.compile and (problem := compile_problem(on_cpu=processes.on_cpu)):
        raise ValueError(f"--compile: {problem}")
    if config.time_limit and processes.world_size > 1:
        raise ValueError(
            "--time-limit plans epochs by timing one process; with "
            f"{processes.world_size} processes set --epochs instead"
        )


def check_batches_per_process(
    train_images: int, *, config: FitConfig, processes: Processes
) -> None:
    """Refuse a run whose training processes get no full batch each: Lightning would run
    no training step, and the run would end with no checkpoint to finish from."""
    batch_size, count = config.batch_size, processes.world_size
    if train_batches_per_process(train_images, batch_size=batch_size, processes=count) > 0:
        return
    each = math.ceil(train_images / count)
    # One process always gets a batch: a partial one is kept when no full one is there.
    most = max(p for p in range(1, count) if math.ceil(train_images / p) >= batch_size)
    fewer = (
        f"--devices {most}"
        if config.num_nodes == 1
        else f"{most} process(es) in all (--devices per node × --num-nodes)"
    )
    raise ValueError(
        f"{train_images} training images over {count} processes give each {each}, fewer "
        f"than --batch-size {batch_size}, and a partial batch is dropped: no process "
        f"would train a step. Use --batch-size {each} or less, or {fewer}"
    )


def share_cpu_cores(processes: Processes) -> None:
    """Give each CPU training process on a node its share of the cores, not all of them:
    processes that each start a thread per core slow one another down."""
    if processes.on_cpu and processes.per_node > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // processes.per_node))


@contextmanager
def speaking_if(main: bool) -> Iterator[None]:
    """convtune's log as it is in the main process; errors only in the others, which would
    repeat every line."""
    log = logging.getLogger("convtune")
    level = log.level
    if not main:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def split_digest(images: LabelledImages, split: Split) -> str:
    """The sha256 of which image is in which part, to compare across processes."""
    digest = hashlib.sha256()
    for name in PARTS:
        for index in split.indices(name):
            digest.update(f"{name}\t{images.paths[index]}\t{images.labels[index]}\n".encode())
    return digest.hexdigest()


class SameSplitEverywhere(L.Callback):
    """Refuse to train when the processes hold different splits (e.g. machines that see
    different files under the same path): each would learn from its own data, silently.
    ``digest``: this process's :func:`split_digest`."""

    def __init__(self, digest: str) -> None:
        self.digest = digest

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size == 1:
            return
        main = trainer.strategy.broadcast(self.digest, src=0)
        if not trainer.strategy.reduce_boolean_decision(main == self.digest, all=True):
            raise RuntimeError(
                "the training processes found different images or splits under --data: "
                "every machine must see the same files at the same path"
            )
