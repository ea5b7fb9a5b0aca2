"""The fine-tuning recipe's phases: BatchNorm statistics, the encoder's warmup after
unfreezing, and the final choice between the probe's and the fine-tuned model."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from convtune.models.factory import create_model
from convtune.training.batchnorm import recalibrate_batchnorm
from convtune.training.budget import (
    EPOCH_OVERHEAD_SECONDS,
    FINISH_SECONDS,
    PLANNED_SHARE,
    plan_epochs,
)
from convtune.training.cli import main
from convtune.training.config import FitConfig
from convtune.training.fit import validation_score
from convtune.training.history import read_history
from convtune.training.module import Recipe, build_optimizer, model_param_groups

RECIPE = Recipe(**FitConfig(data="d", model="m", out="o").recipe_kwargs())


def test_recalibrated_statistics_match_the_data_and_no_weight_changes() -> None:
    torch.manual_seed(0)
    model = create_model("test_efficientnet", 3, img_size=32)
    # Grey, low-contrast images: batch statistics far from the pretrained running ones.
    pixels = 0.3 + 0.05 * torch.randn(64, 1, 32, 32).expand(64, 3, 32, 32).contiguous()
    loader = DataLoader(TensorDataset(pixels, torch.zeros(64)), batch_size=16)
    weights = {k: v.clone() for k, v in model.named_parameters()}
    encoder = model.encoder

    def eval_train_gap() -> float:
        with torch.no_grad():
            encoder.eval()
            frozen = encoder(pixels)
            encoder.train()
            batch = encoder(pixels)
            encoder.eval()
        return float((frozen - batch).abs().mean() / batch.abs().mean())

    before = eval_train_gap()
    momenta = [m.momentum for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert recalibrate_batchnorm(encoder, loader, max_batches=3) == 48
    after = eval_train_gap()
    # What the frozen phase sees is now close to what fine-tuning's batches will see.
    assert after < before / 3, (before, after)
    assert not encoder.training
    for name, value in model.named_parameters():
        assert torch.equal(value, weights[name]), name
    assert momenta == [m.momentum for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # The first layer's running mean is the average of its three batches' means.
    first = next(m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stem = torch.nn.Sequential(*list(encoder.children())[:1])
    with torch.no_grad():
        means = [stem(pixels[i : i + 16]).mean(dim=(0, 2, 3)) for i in (0, 16, 32)]
    torch.testing.assert_close(first.running_mean, torch.stack(means).mean(0), atol=1e-4, rtol=0)


def test_the_encoder_warms_up_again_after_unfreezing() -> None:
    model = create_model("test_resnet", 3)
    recipe = replace(RECIPE, lr=0.1, backbone_lr_scale=0.5)
    groups = model_param_groups(model, recipe, encoder_start_step=10)
    optimizer, schedule = build_optimizer(groups, recipe, total_steps=40, warmup_steps=4)
    head_lr, encoder_lr = [], []
    for _ in range(40):
        head_lr.append(optimizer.param_groups[0]["lr"])
        encoder_lr.append(optimizer.param_groups[2]["lr"])
        optimizer.step()
        schedule.step()
    assert head_lr[4] == pytest.approx(0.1)  # the head is at its peak after 4 steps
    assert encoder_lr[:10] == [0.0] * 10  # frozen: nothing to learn yet
    assert encoder_lr[10] == pytest.approx(0.05 * 0.2 * head_lr[10] / 0.1)
    assert encoder_lr[10] < encoder_lr[11] < encoder_lr[12] < encoder_lr[13]
    assert encoder_lr[14] == pytest.approx(0.5 * head_lr[14])


def test_after_a_probe_the_head_learns_at_the_encoders_rate() -> None:
    recipe = replace(RECIPE, lr=0.01, backbone_lr_scale=0.5, label_smoothing=0.05).after_probe()
    assert (recipe.lr, recipe.backbone_lr_scale, recipe.label_smoothing) == (0.005, 1.0, 0.05)
    groups = model_param_groups(create_model("test_resnet", 3), recipe)
    assert {group["lr"] for group in groups} == {0.005}


@pytest.mark.parametrize(
    "monitor, better",
    [("accuracy", "confident"), ("macro_f1", "confident"), ("loss", "hedging")],
)
def test_validation_score_is_larger_for_the_better_model(monitor: str, better: str) -> None:
    labels = np.array([0, 0, 1, 1])
    # Right on 3 of 4, very confident (and very wrong on the 4th) vs right on 2, hedging.
    confident = np.array([[9.0, 0], [9, 0], [0, 9], [9, 0]])
    hedging = np.array([[0.2, 0], [0.2, 0], [0, 0.2], [0.2, 0]]) * np.array([1, 1, 1, -1])[:, None]
    hedging[1] = [-0.2, 0]
    scores = {
        name: validation_score(logits, labels, monitor, 2)
        for name, logits in (("confident", confident), ("hedging", hedging))
    }
    assert max(scores, key=scores.get) == better


def test_the_probe_is_kept_when_fine_tuning_makes_things_worse(
    shapes_dir: Path, tmp_path: Path, fit_args: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    # An absurd encoder learning rate wrecks the fine-tuned model; the probe's must win.
    args = [*fit_args, "--epochs", "2", "--freeze-epochs", "1", "--cache-features",
            "--backbone-lr-scale", "1000", "--test-fraction", "0"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="convtune"):
        assert main(["fit", "--data", str(shapes_dir), "--out", str(tmp_path), *args]) == 0
    assert "keeping the linear probe's model" in caplog.text
    probe_accuracy = float(caplog.text.split("val accuracy ")[1].split()[0])
    saved = json.loads((tmp_path / "model.json").read_text())["val_metrics"]["accuracy"]
    assert saved == pytest.approx(probe_accuracy, abs=1e-4)


def test_plan_epochs_fits_the_budget_and_refuses_an_impossible_one() -> None:
    plan = plan_epochs(seconds_left=100, train_step=1.0, eval_batch=0.5,
                       train_steps_per_epoch=10, val_batches=4, test_batches=2)  # fmt: skip
    # An epoch: 10 + 2 s + the overhead; finishing: 3 s + the fixed cost.
    epoch = 12 + EPOCH_OVERHEAD_SECONDS
    assert plan.epochs == int((PLANNED_SHARE * 100 - 3 - FINISH_SECONDS) // epoch)
    assert plan.epochs * plan.epoch_seconds + plan.finish_seconds <= 100
    # Eight test-time views make the final passes eight times as long.
    viewed = plan_epochs(seconds_left=100, train_step=1.0, eval_batch=0.5,
                         train_steps_per_epoch=10, val_batches=4, test_batches=2,
                         views=8)  # fmt: skip
    assert viewed.finish_seconds == pytest.approx(8 * 3 + FINISH_SECONDS)
    assert viewed.epochs == int((PLANNED_SHARE * 100 - 24 - FINISH_SECONDS) // epoch)
    with pytest.raises(ValueError, match="raise --time-limit"):
        plan_epochs(seconds_left=20, train_step=1.0, eval_batch=0.5,
                    train_steps_per_epoch=10, val_batches=4, test_batches=2)  # fmt: skip


class SimulatedMachine:
    """A test clock for ``fit``'s planning and Lightning's ``max_time``: time passes only
    as the model runs, ``seconds_per_image`` for each image through its forward pass. The
    run then plans and stops the same way on any machine, however busy its cores are."""

    def __init__(self, seconds_per_image: float) -> None:
        self.now = 0.0
        self.seconds_per_image = seconds_per_image

    def monotonic(self) -> float:
        return self.now

    perf_counter = monotonic

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from lightning.pytorch.callbacks import timer

        from convtune.models.factory import ImageClassifier
        from convtune.training import budget, fit

        for module in (fit, budget, timer):
            monkeypatch.setattr(module, "time", self)
        forward = ImageClassifier.forward

        def timed_forward(model: ImageClassifier, pixels: torch.Tensor) -> torch.Tensor:
            self.now += self.seconds_per_image * len(pixels)
            return forward(model, pixels)

        monkeypatch.setattr(ImageClassifier, "forward", timed_forward)


TIME_LIMIT_S = 45  # on the simulated machine: 3 epochs of the suite's recipe on 90 images


@pytest.fixture(scope="module")
def few_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from convtune.data.synthetic import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("few"), per_class=50, size=40, seed=0)


def fit_to_time_limit(
    data: Path, run_dir: Path, fit_args: list[str], caplog: pytest.LogCaptureFixture
) -> tuple[int, list[int]]:
    """``fit`` with ``--time-limit``: the epochs it planned, and the epochs it validated."""
    args = [*fit_args, "--tta", "none", "--epochs", "10000", "--time-limit", str(TIME_LIMIT_S)]
    with caplog.at_level(logging.INFO, logger="convtune"):
        assert main(["fit", "--data", str(data), "--out", str(run_dir), *args]) == 0
    assert "epoch(s) planned" in caplog.text
    planned = yaml.safe_load((run_dir / "config.yaml").read_text())["epochs"]
    history = read_history(run_dir)
    return planned, [entry["epoch"] for entry in history if entry["val_loss"] is not None]


def test_fit_with_a_time_limit_plans_its_epochs_and_ends_in_time(
    few_shapes: Path, tmp_path: Path, fit_args: list[str], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    machine = SimulatedMachine(seconds_per_image=0.05)
    machine.install(monkeypatch)
    planned, ran = fit_to_time_limit(few_shapes, tmp_path, fit_args, caplog)
    assert planned == 3
    # The whole planned schedule ran (the backstop did not have to stop it), and the run,
    # its final evaluation included, ended within the limit.
    assert ran == list(range(planned))
    assert machine.now <= TIME_LIMIT_S


def test_a_machine_that_slows_down_is_stopped_at_the_time_limit(
    few_shapes: Path, tmp_path: Path, fit_args: list[str], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Planned on a machine that then runs four times slower: Lightning's ``max_time`` stops
    training in its second epoch (which it still validates), short of the three planned,
    and the run still finishes its report."""
    from convtune.training import fit

    machine = SimulatedMachine(seconds_per_image=0.05)
    machine.install(monkeypatch)
    plan_to_time_limit = fit.plan_to_time_limit

    def plan_then_slow_down(*args: object, **kwargs: object) -> object:
        planned = plan_to_time_limit(*args, **kwargs)
        machine.seconds_per_image *= 4
        return planned

    monkeypatch.setattr(fit, "plan_to_time_limit", plan_then_slow_down)
    planned, ran = fit_to_time_limit(few_shapes, tmp_path, fit_args, caplog)
    assert (planned, ran) == (3, [0, 1])
    assert (tmp_path / "report.html").is_file()


def test_a_last_batch_of_one_image_does_not_stop_the_batchnorm_estimate(tmp_path: Path) -> None:
    # 48 training images at batch 47: the estimate's last batch would hold one image, whose
    # 1x1 maps at 32 px give BatchNorm one value per channel.
    from convtune.data.synthetic import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "shapes", per_class=20, size=32, seed=0)
    fit = [
        "fit", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "test_resnet",
        "--pretrained", "none", "--img-size", "32", "--epochs", "1", "--freeze-epochs", "1",
        "--batch-size", "47", "--num-workers", "0",
    ]  # fmt: skip
    assert main(fit) == 0
