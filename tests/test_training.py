"""The training recipe: frozen phase, schedule, param groups, config, resume, CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from data.datamodule import ImageDataModule
from data.sources import load_labelled_images
from data.splits import stratified_split
from models.factory import create_model
from training.callbacks import EncoderFreeze
from training.cli import build_parser, main
from training.config import FitConfig, resolve_config
from training.module import ClassifierModule, Recipe, param_groups, warmup_cosine


def small_datamodule(shapes_dir: Path, model) -> ImageDataModule:
    images = load_labelled_images(shapes_dir)
    images = images.subset([i for i in range(len(images)) if i % 10 == 0])  # 60 images
    split = stratified_split(images.labels, images.classes, val_fraction=0.2, seed=0)
    return ImageDataModule(images, split, model.preprocessing, batch_size=8, num_workers=0)


def train_one_epoch(
    module: ClassifierModule, datamodule, freeze_epochs: int, *, keep_bn_eval: bool = False
) -> None:
    freeze = EncoderFreeze(freeze_epochs, keep_bn_eval=keep_bn_eval)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[freeze])  # fmt: skip
    trainer.fit(module, datamodule=datamodule)


def test_frozen_encoder_keeps_weights_and_batchnorm_statistics(shapes_dir: Path) -> None:
    torch.manual_seed(0)
    model = create_model("test_efficientnet", 3, img_size=40)
    module = ClassifierModule(model, Recipe(lr=0.05, warmup_epochs=0))
    datamodule = small_datamodule(shapes_dir, model)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}

    train_one_epoch(module, datamodule, freeze_epochs=1)
    for name, value in model.encoder.state_dict().items():  # weights and running stats
        assert torch.equal(value, encoder_before[name]), name
    assert any(not torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())

    train_one_epoch(module, datamodule, freeze_epochs=0)
    assert not torch.equal(model.encoder.conv_stem.weight, encoder_before["conv_stem.weight"])
    assert not torch.equal(model.encoder.bn1.running_mean, encoder_before["bn1.running_mean"])


def test_keep_bn_eval_fine_tunes_weights_but_not_batchnorm_statistics(shapes_dir: Path):
    torch.manual_seed(0)
    model = create_model("test_efficientnet", 3, img_size=40)
    module = ClassifierModule(model, Recipe(lr=0.05, warmup_epochs=0))
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    train_one_epoch(module, small_datamodule(shapes_dir, model), 0, keep_bn_eval=True)
    assert not torch.equal(model.encoder.conv_stem.weight, before["conv_stem.weight"])
    assert not torch.equal(model.encoder.bn1.weight, before["bn1.weight"])  # affine learns
    assert torch.equal(model.encoder.bn1.running_mean, before["bn1.running_mean"])
    assert torch.equal(model.encoder.bn1.running_var, before["bn1.running_var"])


def test_warmup_then_cosine_schedule() -> None:
    values = [warmup_cosine(step, 4, 20) for step in range(21)]
    assert values[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert values[4] == pytest.approx(1.0)
    assert values[12] == pytest.approx(0.5)
    assert values[20] == pytest.approx(0.0)
    assert all(a >= b for a, b in itertools.pairwise(values[4:]))


def test_no_weight_decay_on_norms_and_biases() -> None:
    model = create_model("test_resnet", 3)
    decay, no_decay = param_groups(model, lr=0.1, weight_decay=1e-4)
    assert all(p.ndim > 1 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    bn_weight = model.encoder.bn1.weight
    assert any(p is bn_weight for p in no_decay["params"])


def test_config_layers_defaults_yaml_and_flags(tmp_path: Path) -> None:
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("data: d\nmodel: test_resnet\nout: o\nepochs: 7\nbatch-size: 4\n")
    config = resolve_config(yaml_file, {"epochs": 3})
    assert (config.epochs, config.batch_size, config.lr) == (3, 4, FitConfig.lr)
    with pytest.raises(ValueError, match="unknown option"):
        resolve_config(None, {"data": "d", "model": "m", "out": "o", "epochz": 1})
    with pytest.raises(ValueError, match="missing required option"):
        resolve_config(None, {"data": "d"})
    with pytest.raises(ValueError, match="freeze_epochs"):
        resolve_config(None, {"data": "d", "model": "m", "out": "o", "freeze_epochs": 99})


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("fit", "export", "predict", "evaluate", "weights"):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: convtune " + command in capsys.readouterr().out


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys) -> None:
    code = main(["fit", "--data", str(tmp_path / "nope"), "--model", "test_resnet",
                 "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_fit_writes_a_complete_run_directory(trained_run: Path) -> None:
    for name in ("config.yaml", "split.json", "classes.json", "model.safetensors",
                 "model.json", "logs/version_0/metrics.csv", "checkpoints/best.ckpt",
                 "checkpoints/last.ckpt"):  # fmt: skip
        assert (trained_run / name).is_file(), name
    description = json.loads((trained_run / "model.json").read_text())
    assert description["classes"] == ["circle", "square", "triangle"]
    assert description["temperature"] == description["val_metrics"]["temperature"] > 0
    # The shapes task is learnable: clearly better than chance (1/3) after 2 epochs.
    assert description["val_metrics"]["accuracy"] > 0.6


def test_resume_continues_from_the_last_checkpoint(
    shapes_dir: Path, tmp_path: Path, fit_args: list[str]
) -> None:
    run_dir = tmp_path / "run"
    args = [*fit_args]
    args[args.index("--epochs") + 1] = "1"
    assert main(["fit", "--data", str(shapes_dir), "--out", str(run_dir), *args]) == 0
    split_before = (run_dir / "split.json").read_text()
    assert main(["fit", "--out", str(run_dir), "--resume", "--epochs", "2"]) == 0
    assert (run_dir / "split.json").read_text() == split_before
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 1  # the second epoch ran after resuming
    assert (run_dir / "logs" / "version_0" / "metrics.csv").is_file()  # nothing overwritten
    assert (run_dir / "logs" / "version_1" / "metrics.csv").is_file()


def test_fit_reports_on_the_held_out_test_part(trained_run: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())
    split = json.loads((trained_run / "split.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] == len(split["test"])
    for key in ("accuracy", "macro_f1", "ece", "nll", "per_class", "confusion_matrix"):
        assert key in metrics, key
    assert set(metrics["per_class"]) == {"circle", "square", "triangle"}
    assert metrics["binary"]["negative_classes"] == ["circle"]
    assert 0 <= metrics["binary"]["accuracy"] <= 1
    assert len(metrics["reliability"]["calibrated"]) == 15
    report = (trained_run / "report.html").read_text()
    for heading in ("Confusion matrix", "Per class", "Calibration", "Most confidently wrong"):
        assert heading in report
    assert report.count("data:image/png;base64,") >= 2  # confusion + reliability figures


def test_linear_probe_trains_the_head_on_cached_features(shapes_dir: Path) -> None:
    from training.probe import linear_probe

    torch.manual_seed(0)
    model = create_model("test_resnet", 3, img_size=40)
    datamodule = small_datamodule(shapes_dir, model)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = model.head[-1].weight.clone()
    history = linear_probe(model, datamodule, Recipe(lr=0.1), epochs=3, seed=0)
    assert [sorted(epoch) for epoch in history] == [["train_loss", "val_accuracy", "val_loss"]] * 3
    assert all(0.0 <= epoch["val_accuracy"] <= 1.0 for epoch in history)
    for name, value in model.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[name]), name
    assert not torch.equal(model.head[-1].weight, head_before)


def test_fit_with_cached_features_runs_only_the_unfrozen_epochs(
    shapes_dir: Path, tmp_path: Path, fit_args: list[str]
) -> None:
    args = [*fit_args, "--freeze-epochs", "1", "--cache-features", "--cache-images"]
    assert main(["fit", "--data", str(shapes_dir), "--out", str(tmp_path), *args]) == 0
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 0  # 2 epochs: 1 as the probe, 1 with Lightning
    assert json.loads((tmp_path / "model.json").read_text())["val_metrics"]["accuracy"] > 0.5
