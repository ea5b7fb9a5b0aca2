"""Training on several devices: two CPU processes under DDP (gloo) train one run as one
process does, and settings that cannot train (this machine's devices, too few images per
process) are refused before any work."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import fit_refused
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DataLoader

from convtune.data.datamodule import drops_last_batch, train_batches_per_process
from convtune.data.synthetic import make_shapes_dataset
from convtune.models.artifact import LOGS_DIR, SPLIT_FILE, read_model_description
from convtune.training.history import read_history

ROOT = Path(__file__).resolve().parents[1]
# Two processes of 8 images a step make the suite recipe's batch of 16: the same steps
# per epoch at the same learning rate, so the two runs can be compared.
DDP_ARGS = ["--accelerator", "cpu", "--strategy", "ddp", "--devices", "2", "--batch-size", "8"]
# The two runs see their batches in other orders and normalise BatchNorm over 8 images,
# not 16, so they differ as two seeds do. On the 120 val images at ≈0.93 accuracy one run's
# binomial standard error is ≈0.023, a difference of two ≈0.033: 0.1 is three of those,
# where a run that failed to learn in parallel (≈0.33, chance) is far outside.
VAL_ACCURACY_TOLERANCE = 0.1
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


@pytest.mark.slow
@two_cores
def test_two_processes_train_one_run_as_well_as_one_process(
    shapes_dir: Path, fit_args: list[str], trained_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "ddp"
    result = fit_in_processes(
        ["--data", str(shapes_dir), "--out", str(run_dir), *fit_args, *DDP_ARGS]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)  # one document: only the main process printed
    assert summary["run_dir"] == str(run_dir)
    # Written once: one log version, the split the single-process run made, nothing partial.
    assert [d.name for d in (run_dir / LOGS_DIR).iterdir()] == ["version_0"]
    assert (run_dir / SPLIT_FILE).read_text() == (trained_run / SPLIT_FILE).read_text()
    assert not list(run_dir.glob("*.partial"))
    assert result.stderr.count("split: train") == 1
    assert [entry["epoch"] for entry in read_history(run_dir)] == [0, 1]
    single = read_model_description(trained_run).val_metrics["accuracy"]
    assert summary["val"]["accuracy"] == pytest.approx(single, abs=VAL_ACCURACY_TOLERANCE)
    assert summary["test"]["n"] > 0 and Path(summary["report"]).is_file()

    # Resumed, the saved config's devices and strategy train it on again: one more epoch,
    # one more log version.
    resumed = fit_in_processes(["--resume", "--out", str(run_dir), "--epochs", "3"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(d.name for d in (run_dir / LOGS_DIR).iterdir()) == ["version_0", "version_1"]
    assert [entry["epoch"] for entry in read_history(run_dir)] == [0, 1, 2]
    assert json.loads(resumed.stdout)["val"]["n"] == summary["val"]["n"]


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
