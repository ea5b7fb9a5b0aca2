"""Training on several devices: two CPU processes under DDP (gloo) train one run as one
process does, frozen stages, linear probe and BatchNorm re-estimate included, and settings
that cannot train (this machine's devices, too few images per process) are refused before
any work."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from itertools import chain
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import fit_refused
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DataLoader

from convtune.data.datamodule import drops_last_batch, train_batches_per_process
from convtune.data.synthetic import make_shapes_dataset
from convtune.models.artifact import (
    CHECKPOINT_DIR,
    LAST_CHECKPOINT,
    LOGS_DIR,
    SPLIT_FILE,
    read_model_description,
)
from convtune.models.factory import create_model, first_stages
from convtune.training.config import FitConfig, load_saved_config
from convtune.training.devices import SameSplitEverywhere, plan_processes
from convtune.training.fit import freezes_in_trainer, prepare_split
from convtune.training.history import FINE_TUNE, FROZEN, read_history

ROOT = Path(__file__).resolve().parents[1]
# Two processes of 8 images a step make the suite recipe's batch of 16.
DDP_ARGS = ["--accelerator", "cpu", "--strategy", "ddp", "--devices", "2", "--batch-size", "8"]
# The suite's recipe with what DDP changes: the first encoder stage frozen throughout (DDP
# must be told, training/devices.py), the frozen epoch as a linear probe, and before it the
# BatchNorm re-estimate, both in the main process alone, before the other one starts. Then
# two epochs fine-tuning all the rest at one rate, which one process with a batch of 16
# ends at ≈0.93 val accuracy. No test part and one view: what fit does after training
# runs in the main process alone, as it does without DDP.
DDP_RECIPE = [
    "--cache-features", "--freeze-epochs", "1", "--freeze-stages", "1", "--epochs", "3",
    "--backbone-lr-scale", "1", "--test-fraction", "0", "--tta", "none",
]  # fmt: skip
# Under probe.ONNX_MIN_IMAGES train and val images, whose export costs seconds: 96 val.
DDP_PER_CLASS = 160
FIND_UNUSED = "training processes: 2 (ddp_find_unused_parameters_true)"
# The two processes see their batches in other orders and normalise BatchNorm over 8
# images, not 16, so they differ from one process as two seeds do: on 96 val images at
# ≈0.93 a run's binomial standard error is ≈0.026, a difference of two ≈0.037, and 0.8 is
# over three of those below. Fine-tuning that failed in parallel leaves the probe's model
# (≈0.7) or chance (≈0.33) below it.
VAL_ACCURACY_FLOOR = 0.8
two_cores = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="two training processes need two cores"
)


def fit_in_processes(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``convtune fit`` as users start it: Lightning's DDP launcher starts the command
    again for the second process, which only a process of its own can do."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "convtune", "fit", *args],
        capture_output=True, text=True, env=env, timeout=900, check=False,
    )  # fmt: skip


def last_checkpoint(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT, weights_only=True)


def frozen_stage_tensors(stages: int) -> set[str]:
    """The checkpoint names of the weights and BatchNorm statistics of the encoder's first
    ``stages`` stages."""
    model = create_model("test_resnet", 3, pretrained="none")
    frozen = first_stages(model.encoder, stages)
    return {
        f"model.{module_name}.{name}"
        for module_name, module in model.named_modules()
        if any(module is stage_module for stage_module in frozen)
        for name, _ in chain(
            module.named_parameters(recurse=False), module.named_buffers(recurse=False)
        )
    }


def single_process_split(run_dir: Path, tmp_path: Path) -> str:
    """The split file one process makes for ``run_dir``'s configuration."""
    alone = tmp_path / "one-process"
    alone.mkdir()
    prepare_split(replace(load_saved_config(run_dir), out=str(alone)), alone)
    return (alone / SPLIT_FILE).read_text()


@pytest.mark.slow
@two_cores
def test_two_processes_train_frozen_stages_after_a_probe_and_resume(
    fit_args: list[str], tmp_path: Path
) -> None:
    data = make_shapes_dataset(tmp_path / "shapes", per_class=DDP_PER_CLASS, size=40, seed=0)
    run_dir = tmp_path / "ddp"
    result = fit_in_processes(
        ["--data", str(data), "--out", str(run_dir), *fit_args, *DDP_RECIPE, *DDP_ARGS]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)  # one document: only the main process printed
    assert summary["run_dir"] == str(run_dir)
    # A frozen stage gets no gradient, so DDP must look for unused parameters; without it
    # the second step fails waiting for theirs.
    assert result.stderr.count(FIND_UNUSED) == 1
    # The main process speaks for the run, and splits, re-estimates BatchNorm and probes
    # before the other starts from its weights. The split is the one a single process
    # makes; the other process holds the same (SameSplitEverywhere) or the run stops.
    for once in ("split: train", "BatchNorm statistics re-estimated", "linear probe: 1 epochs"):
        assert result.stderr.count(once) == 1, once
    assert (run_dir / SPLIT_FILE).read_text() == single_process_split(run_dir, tmp_path)
    assert not list(run_dir.glob("*.partial"))
    assert [d.name for d in (run_dir / LOGS_DIR).iterdir()] == ["version_0"]
    history = read_history(run_dir)
    assert [entry["phase"] for entry in history] == [FROZEN, FINE_TUNE, FINE_TUNE]
    # Each process trained on its half of the training images in each fine-tuning epoch.
    train_images = len(json.loads((run_dir / SPLIT_FILE).read_text())["train"])
    batches = train_batches_per_process(train_images, batch_size=8, processes=2)
    trained = last_checkpoint(run_dir)
    assert trained["global_step"] == 2 * batches
    # The fine-tuned model, not only the probe's, learned the task.
    assert history[-1]["val_accuracy"] >= VAL_ACCURACY_FLOOR
    assert summary["val"]["accuracy"] >= VAL_ACCURACY_FLOOR
    assert read_model_description(run_dir).val_metrics["accuracy"] == summary["val"]["accuracy"]

    # Resumed, the saved config's devices and strategy train it on again: one more
    # fine-tuning epoch, one more log version, no second probe; the frozen stage holds.
    resumed = fit_in_processes(["--resume", "--out", str(run_dir), "--epochs", "4"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count(FIND_UNUSED) == 1
    assert "linear probe" not in resumed.stderr
    assert sorted(d.name for d in (run_dir / LOGS_DIR).iterdir()) == ["version_0", "version_1"]
    assert [entry["phase"] for entry in read_history(run_dir)] == [FROZEN] + 3 * [FINE_TUNE]
    assert json.loads(resumed.stdout)["val"]["n"] == summary["val"]["n"]
    retrained = last_checkpoint(run_dir)
    assert retrained["global_step"] == 3 * batches
    before, after = trained["state_dict"], retrained["state_dict"]
    frozen = frozen_stage_tensors(1)
    assert frozen and all(torch.equal(before[name], after[name]) for name in frozen)
    assert not all(torch.equal(before[name], after[name]) for name in before.keys() - frozen)


def test_an_unknown_accelerator_is_refused_with_the_names_there_are(capsys, tmp_path) -> None:
    error = fit_refused(["--accelerator", "tpuu"], capsys, tmp_path)
    assert "cannot train with --accelerator tpuu" in error
    assert "Available names are: auto" in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_on_a_machine_without_one_is_fit_refused(capsys, tmp_path) -> None:
    error = fit_refused(["--accelerator", "gpu", "--devices", "4"], capsys, tmp_path)
    assert "cannot train with --accelerator gpu --devices 4" in error


def test_more_cpu_processes_than_cores_are_fit_refused(capsys, tmp_path) -> None:
    cores = len(os.sched_getaffinity(0))
    error = fit_refused(["--accelerator", "cpu", "--devices", str(cores + 1)], capsys, tmp_path)
    assert f"more than this machine's {cores} cores: use --devices {cores} or fewer" in error


def test_a_strategy_that_is_not_installed_or_unknown_is_fit_refused(capsys, tmp_path) -> None:
    if importlib.util.find_spec("deepspeed") is None:  # never a dependency of ours
        error = fit_refused(["--strategy", "deepspeed"], capsys, tmp_path)
        assert "you must have DeepSpeed installed" in error
    error = fit_refused(["--strategy", "fsdp", "--accelerator", "cpu"], capsys, tmp_path)
    assert "requires a GPU accelerator" in error
    error = fit_refused(["--strategy", "ddpp"], capsys, tmp_path)
    assert "invalid strategy name: `strategy='ddpp'`" in error


@two_cores
def test_a_time_limit_with_several_processes_is_fit_refused(capsys, tmp_path) -> None:
    args = ["--accelerator", "cpu", "--devices", "2", "--time-limit", "60"]
    error = fit_refused(args, capsys, tmp_path)
    assert "--time-limit plans epochs by timing one process" in error


@pytest.mark.parametrize(
    ("options", "strategy"),
    [
        ({"freeze_epochs": 1}, "ddp_find_unused_parameters_true"),  # Lightning's frozen epoch
        ({"freeze_epochs": 0, "freeze_stages": 1}, "ddp_find_unused_parameters_true"),
        # The probe runs the frozen epoch before DDP starts: then nothing is frozen in DDP.
        ({"freeze_epochs": 1, "cache_features": True}, "ddp"),
        ({"freeze_epochs": 0}, "ddp"),
    ],
)
def test_ddp_looks_for_unused_parameters_only_where_some_are_frozen_while_it_trains(
    options: dict, strategy: str
) -> None:
    config = FitConfig(data="d", model="test_resnet", out="o", accelerator="cpu",
                       strategy="ddp", **options)  # fmt: skip
    assert plan_processes(config, freezes_parameters=freezes_in_trainer(config)).strategy == (
        strategy
    )


class MainProcessHolds:
    """A strategy of several processes, seen from one that is not the main one: the main
    process broadcasts ``digest``, and all decide as this one does."""

    def __init__(self, digest: str) -> None:
        self.digest = digest

    def broadcast(self, obj: str, src: int = 0) -> str:
        return self.digest

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision


def test_processes_holding_another_split_than_the_main_ones_refuse_to_train() -> None:
    trainer = SimpleNamespace(world_size=2, strategy=MainProcessHolds("main's"))
    SameSplitEverywhere("main's").setup(trainer, None, "fit")
    with pytest.raises(RuntimeError, match="found different images or splits under --data"):
        SameSplitEverywhere("its own").setup(trainer, None, "fit")


@pytest.mark.parametrize(
    ("images", "batch_size", "processes", "batches"),
    [
        (48, 32, 2, 0),  # 24 each: a partial batch, dropped
        (48, 24, 2, 1),
        (20, 32, 1, 1),  # no full batch at all: the partial one is kept
        (48, 32, 1, 1),
        (144, 32, 2, 2),
        (47, 8, 3, 2),  # 16 each, one image repeated to even them out
    ],
)
def test_batches_per_process_are_those_lightning_hands_each_process(
    images: int, batch_size: int, processes: int, batches: int
) -> None:
    assert train_batches_per_process(images, batch_size=batch_size, processes=processes) == (
        batches
    )
    # The train loader's rule, with the sampler Lightning puts in each process's copy.
    loader = DataLoader(range(images), batch_size=batch_size, shuffle=True,
                        drop_last=drops_last_batch(images, batch_size))  # fmt: skip
    for rank in range(processes):
        sampler = _get_distributed_sampler(
            loader, shuffle=True, overfit_batches=0, num_replicas=processes, rank=rank
        )
        assert len(_update_dataloader(loader, sampler)) == batches


@pytest.fixture(scope="module")
def shapes_48_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 images of each of 3 shapes: 48 for training at the default val fraction."""
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes-20"), per_class=20, size=40,
                               seed=0)  # fmt: skip


@pytest.mark.parametrize(
    ("devices", "fewer"),
    [
        pytest.param(["--devices", "2"], "--devices 1", marks=two_cores),
        (["--devices", "1", "--num-nodes", "2"], "1 process(es) in all"),
    ],
)
def test_processes_that_would_get_no_full_batch_are_fit_refused(
    devices: list[str], fewer: str, shapes_48_train: Path, capsys, tmp_path
) -> None:
    # The data is read (the count of training images decides), but no run directory made.
    args = ["--data", str(shapes_48_train), "--accelerator", "cpu", "--strategy", "ddp"]
    error = fit_refused([*args, *devices], capsys, tmp_path)
    assert (
        "48 training images over 2 processes give each 24, fewer than --batch-size 32, and a "
        f"partial batch is dropped: no process would train a step. Use --batch-size 24 or "
        f"less, or {fewer}"
    ) in error
