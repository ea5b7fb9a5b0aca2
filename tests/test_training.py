"""The training recipe: frozen phase, schedule, param groups, config, resume, CLI."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file
from timm.data import resolve_model_data_config

from convtune.data.datamodule import ImageDataModule
from convtune.data.datasets import load_labelled_images
from convtune.data.preprocessing import Preprocessing
from convtune.data.splits import PARTS, stratified_split
from convtune.data.synthetic import make_shapes_dataset
from convtune.data.transforms import Augmentation
from convtune.models.factory import create_model, encoder_stages
from convtune.training.callbacks import EncoderFreeze, WeightEMA
from convtune.training.cli import build_parser, main
from convtune.training.config import FitConfig, resolve_config
from convtune.training.fit import build_model
from convtune.training.module import (
    ClassifierModule,
    Recipe,
    build_loss,
    param_groups,
    warmup_cosine,
)

# FitConfig's defaults, the settings each test changes replaced in.
DEFAULTS = FitConfig(data="d", model="m", out="o")
RECIPE = Recipe(**DEFAULTS.recipe_kwargs())
AUGMENTATION = Augmentation(**DEFAULTS.augmentation_kwargs())


def small_datamodule(shapes_dir: Path, model) -> ImageDataModule:
    images = load_labelled_images(shapes_dir)
    images = images.subset([i for i in range(len(images)) if i % 10 == 0])  # 60 images
    split = stratified_split(images.labels, images.classes, val_fraction=0.2, seed=0)
    return ImageDataModule(images, split, model.preprocessing, augmentation=AUGMENTATION,
                           batch_size=8, num_workers=0)  # fmt: skip


def train_one_epoch(
    module: ClassifierModule,
    datamodule,
    freeze_epochs: int,
    *,
    keep_bn_eval: bool = False,
    freeze_stages: int = 0,
) -> L.Trainer:
    freeze = EncoderFreeze(freeze_epochs, keep_bn_eval=keep_bn_eval, freeze_stages=freeze_stages)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[freeze])  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return trainer


def test_frozen_encoder_keeps_weights_and_batchnorm_statistics(shapes_dir: Path) -> None:
    torch.manual_seed(0)
    model = create_model("test_efficientnet", 3, img_size=40)
    module = ClassifierModule(model, replace(RECIPE, lr=0.05, warmup_epochs=0))
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
    module = ClassifierModule(model, replace(RECIPE, lr=0.05, warmup_epochs=0))
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    train_one_epoch(module, small_datamodule(shapes_dir, model), 0, keep_bn_eval=True)
    assert not torch.equal(model.encoder.conv_stem.weight, before["conv_stem.weight"])
    assert not torch.equal(model.encoder.bn1.weight, before["bn1.weight"])  # affine learns
    assert torch.equal(model.encoder.bn1.running_mean, before["bn1.running_mean"])
    assert torch.equal(model.encoder.bn1.running_var, before["bn1.running_var"])


def own_tensors(modules: list[torch.nn.Module]) -> list[torch.Tensor]:
    return [tensor for module in modules
            for tensor in itertools.chain(module.parameters(recurse=False),
                                          module.buffers(recurse=False))]  # fmt: skip


def test_frozen_stages_stay_as_they_were_while_later_stages_fine_tune(shapes_dir: Path):
    torch.manual_seed(0)
    model = create_model("test_efficientnet", 3, img_size=40)
    module = ClassifierModule(model, replace(RECIPE, lr=0.05, warmup_epochs=0))
    stages = encoder_stages(model.encoder)
    frozen = own_tensors([module for stage in stages[:2] for module in stage])
    later = own_tensors([module for stage in stages[2:] for module in stage])
    assert any(tensor is model.encoder.bn1.running_var for tensor in frozen)  # stem included
    frozen_before = [tensor.clone() for tensor in frozen]
    later_before = [tensor.clone() for tensor in later]

    trainer = train_one_epoch(module, small_datamodule(shapes_dir, model), 0, freeze_stages=2)
    for tensor, before in zip(frozen, frozen_before, strict=True):  # weights and statistics
        assert torch.equal(tensor, before)
    for tensor, before in zip(later, later_before, strict=True):
        assert not torch.equal(tensor, before)
    # No gradients, so SGD skips them: no momentum buffers, no weight decay.
    state = trainer.optimizers[0].state
    assert not any(tensor in state for tensor in frozen)
    assert all(parameter in state for parameter in model.encoder.blocks[2].parameters())


def test_more_frozen_stages_than_the_encoder_has_fail_when_the_model_is_built() -> None:
    config = FitConfig(data="d", model="test_efficientnet", out="o", pretrained="none",
                       freeze_stages=6)  # fmt: skip
    with pytest.raises(ValueError, match="freeze_stages=6, but EfficientNet has 5 stages"):
        build_model(config, 3)


def test_the_eval_view_options_reach_the_model() -> None:
    config = FitConfig(data="d", model="test_efficientnet", out="o", pretrained="none",
                       eval_img_size=48, crop_pct=1.0, crop_mode="border")  # fmt: skip
    model = build_model(config, 3)
    assert model.preprocessing.input_size == (48, 48)
    assert (model.preprocessing.crop_pct, model.preprocessing.crop_mode) == (1.0, "border")
    assert model.structure.to_json()["preprocessing"]["crop_mode"] == "border"  # what export writes
    assert resolve_model_data_config(model)["crop_mode"] == "border"


class RecordHeadBias(L.Callback):
    """The output layer's bias after every optimizer step."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(pl_module.model.head[-1].bias.detach().clone())


def manual_ema(values: list[torch.Tensor], decay: float) -> torch.Tensor:
    average = values[0]
    for updates, value in enumerate(values[1:], start=1):
        warm_decay = min(decay, (1 + updates) / (10 + updates))
        average = warm_decay * average + (1 - warm_decay) * value
    return average


def val_loss(module: ClassifierModule, datamodule: ImageDataModule) -> float:
    """Mean loss per image over the val split, as Lightning averages ``val/loss``."""
    module.eval()
    with torch.no_grad():
        batches = [
            (module.loss(module.model(x), y), len(y)) for x, y in datamodule.val_dataloader()
        ]
    return float(sum(loss * n for loss, n in batches) / sum(n for _, n in batches))


def test_ema_weights_are_validated_and_checkpointed(shapes_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("test_efficientnet", 3, img_size=40)
    module = ClassifierModule(model, replace(RECIPE, lr=0.05, warmup_epochs=0))
    datamodule = small_datamodule(shapes_dir, model)
    record = RecordHeadBias()
    callbacks = [record, EncoderFreeze(0), WeightEMA(0.9),
                 ModelCheckpoint(dirpath=tmp_path, filename="latest")]  # fmt: skip
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=CSVLogger(tmp_path),
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks)  # fmt: skip
    trainer.fit(module, datamodule=datamodule)

    last = torch.load(tmp_path / "latest.ckpt", weights_only=True)
    assert last["averaging_state"]["n_averaged"] == trainer.global_step == len(record.values)
    ema, trained = last["state_dict"], last["current_model_state"]
    key = "model.head.0.bias"
    assert torch.allclose(ema[key], manual_ema(record.values, 0.9), atol=1e-6)
    assert torch.equal(trained[key], record.values[-1])
    assert not torch.allclose(ema[key], trained[key])
    # BatchNorm statistics are averaged with the weights; its batch counter is copied.
    bn = "model.encoder.bn1."
    assert not torch.equal(ema[bn + "running_mean"], trained[bn + "running_mean"])
    assert torch.equal(ema[bn + "num_batches_tracked"], trained[bn + "num_batches_tracked"])

    # What was logged for the last epoch is the EMA's loss (now in the model), not the
    # trained weights'.
    with open(next(tmp_path.glob("lightning_logs/version_0/metrics.csv"))) as file:
        logged = [float(row["val/loss"]) for row in csv.DictReader(file) if row["val/loss"]]
    assert val_loss(module, datamodule) == pytest.approx(logged[-1], rel=1e-5)
    module.load_state_dict(trained)
    assert val_loss(module, datamodule) != pytest.approx(logged[-1], rel=1e-3)


@pytest.fixture(scope="module")
def resumed_run(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory, fit_args: list[str]):
    """A run fitted for 1 epoch (with an EMA of the weights), then resumed to 2: its
    directory and what the first attempt left (last checkpoint, split)."""
    run_dir = tmp_path_factory.mktemp("resumed") / "run"
    args = [*fit_args, "--ema-decay", "0.9", "--epochs", "1"]
    assert main(["fit", "--data", str(shapes_dir), "--out", str(run_dir), *args]) == 0
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    split = (run_dir / "split.json").read_text()
    assert main(["fit", "--out", str(run_dir), "--resume", "--epochs", "2"]) == 0
    return run_dir, first, split


def logged(metrics_csv: Path, column: str) -> list[tuple[int, int, float]]:
    """(epoch, step, value) of every row of a Lightning metrics.csv that has ``column``."""
    with open(metrics_csv) as file:
        rows = [row for row in csv.DictReader(file) if row[column]]
    return [(int(row["epoch"]), int(row["step"]), float(row[column])) for row in rows]


def test_resume_continues_from_the_last_checkpoint(resumed_run) -> None:
    run_dir, first, split = resumed_run
    assert (run_dir / "split.json").read_text() == split
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert (first["epoch"], last["epoch"]) == (0, 1)  # the second epoch ran after resuming
    assert last["global_step"] == 2 * first["global_step"]
    # One log per attempt, nothing overwritten; the second starts where the first ended:
    # at the second epoch, its steps counted on, with the first attempt's weights (a fresh
    # start would repeat the first epoch, the same seed giving the same losses).
    before = logged(run_dir / "logs" / "version_0" / "metrics.csv", "train/loss_step")
    after = logged(run_dir / "logs" / "version_1" / "metrics.csv", "train/loss_step")
    assert {epoch for epoch, _, _ in before} == {0} and {epoch for epoch, _, _ in after} == {1}
    assert min(step for _, step, _ in after) == first["global_step"]
    first_losses = [loss for _, _, loss in before[:3]]
    resumed_losses = [loss for _, _, loss in after[:3]]
    assert np.mean(resumed_losses) < np.mean(first_losses) - 0.1


def test_fit_with_ema_keeps_the_ema_weights_and_resumes(resumed_run) -> None:
    run_dir, first, _ = resumed_run
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    # One EMA update per optimizer step, across the resume.
    assert first["averaging_state"]["n_averaged"] == first["global_step"]
    assert last["averaging_state"]["n_averaged"] == last["global_step"]
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    saved = load_file(run_dir / "model.safetensors")
    for name, value in saved.items():
        assert torch.equal(value, best["state_dict"][f"model.{name}"]), name
    assert not torch.equal(
        saved["head.0.weight"], best["current_model_state"]["model.head.0.weight"]
    )


def loss_minimiser(loss_fn: torch.nn.Module, labels: torch.Tensor, num_classes: int):
    """softmax of the logits (free, one row per label) that minimise ``loss_fn``."""
    logits = torch.zeros(len(labels), num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [logits], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(logits, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return logits.detach().softmax(dim=-1)


def test_class_weights_do_not_move_the_smoothed_target() -> None:
    # ELPV's class counts with `class_weights: auto`: the rarest grade weighs 14x the commonest.
    counts = torch.tensor([1508.0, 295.0, 106.0, 715.0])
    weights = counts.sum() / (len(counts) * counts)
    labels = torch.arange(4)
    smoothing = 0.1
    target = torch.full((4, 4), smoothing / 4, dtype=torch.float64)
    target += (1 - smoothing) * torch.eye(4, dtype=torch.float64)

    loss = build_loss(
        replace(RECIPE, label_smoothing=smoothing, class_weights=tuple(weights.tolist()))
    )
    assert torch.allclose(loss_minimiser(loss, labels, 4), target, atol=1e-6)
    # torch's own loss weights the smoothing term per class too (pytorch/pytorch#104776):
    # a functional cell (class 0) is pushed to put far more than ε/K on the rare grades.
    torch_loss = torch.nn.CrossEntropyLoss(weight=weights.double(), label_smoothing=smoothing)
    torch_minimiser = loss_minimiser(torch_loss, labels, 4)
    assert torch_minimiser[0, 2] > 0.1 > target[0, 2]


def test_smoothed_loss_matches_torch_where_torch_is_right() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 4), torch.randint(0, 4, (16,))
    weights = (0.5, 1.0, 3.0, 2.0)
    for smoothing, class_weights in ((0.1, None), (0.1, (1.0,) * 4), (0.0, weights)):
        ours = build_loss(replace(RECIPE, label_smoothing=smoothing, class_weights=class_weights))
        theirs = torch.nn.CrossEntropyLoss(
            weight=torch.tensor(class_weights) if class_weights else None,
            label_smoothing=smoothing,
        )
        assert torch.allclose(ours(logits, labels), theirs(logits, labels), atol=1e-6)


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
        text = capsys.readouterr().out
        assert "usage: convtune " + command in text
        # A bare % in a help string makes argparse print its own internals instead.
        assert "option_strings" not in text


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys) -> None:
    code = main(["fit", "--data", str(tmp_path / "nope"), "--model", "test_resnet",
                 "--out", str(tmp_path / "run")])  # fmt: skip
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_fit_writes_a_complete_run_directory(trained_run: Path) -> None:
    for name in ("config.yaml", "split.json", "model.safetensors", "model.json",
                 "logs/version_0/metrics.csv", "checkpoints/best.ckpt",
                 "checkpoints/last.ckpt"):  # fmt: skip
        assert (trained_run / name).is_file(), name
    # The class list, in output order, is the split's and written nowhere else in the run.
    split = json.loads((trained_run / "split.json").read_text())
    assert split["classes"] == ["circle", "square", "triangle"]
    assert not (trained_run / "classes.json").exists()
    description = json.loads((trained_run / "model.json").read_text())
    assert "classes" not in description
    assert description["temperature"] == description["val_metrics"]["temperature"] > 0
    # The shapes task is learnable: clearly better than chance (1/3) after 2 epochs.
    assert description["val_metrics"]["accuracy"] > 0.6


def test_the_best_checkpoint_describes_itself(trained_run: Path) -> None:
    path = trained_run / "checkpoints" / "best.ckpt"
    module = ClassifierModule.load_from_checkpoint(path, weights_only=True)
    assert (module.recipe.lr, module.recipe.optimizer, module.recipe.freeze_epochs) == (
        0.1, "sgd", 0
    )  # fmt: skip
    description = json.loads((trained_run / "model.json").read_text())
    assert module.hparams["model"]["architecture"] == description["architecture"]
    expected_view = Preprocessing.from_dict(description["preprocessing"])
    assert module.model.preprocessing == expected_view
    saved = load_file(trained_run / "model.safetensors")  # the best weights
    rebuilt = module.model.state_dict()
    assert rebuilt.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(rebuilt[name], value), name


def scores(matrix: np.ndarray, index: int) -> dict[str, float]:
    """Class ``index``'s precision, recall, F1 and support from a confusion matrix (0 where
    a ratio has nothing to divide by)."""
    hits, predicted, support = matrix[index, index], matrix[:, index].sum(), matrix[index].sum()
    precision = hits / predicted if predicted else 0.0
    recall = hits / support if support else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def test_fit_reports_on_the_held_out_test_part(trained_run: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())
    split = json.loads((trained_run / "split.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] == len(split["test"])
    # The scores are those of the confusion matrix (rows: true class; columns: predicted).
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.sum() == metrics["n"]
    assert metrics["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert list(metrics["per_class"]) == split["classes"]
    for index, name in enumerate(split["classes"]):
        assert metrics["per_class"][name] == pytest.approx(scores(matrix, index)), name
    f1s = [scores(matrix, index)["f1"] for index in range(len(matrix))]
    assert metrics["macro_f1"] == pytest.approx(np.mean(f1s))
    # The binary view: circle (negative) against the other two, the same predictions.
    binary = metrics["binary"]
    assert binary["negative_classes"] == ["circle"]
    positive = np.array([name not in binary["negative_classes"] for name in split["classes"]])
    sides = (~positive, positive)
    collapsed = [[int(matrix[np.ix_(truth, guess)].sum()) for guess in sides] for truth in sides]
    assert binary["confusion_matrix"] == collapsed
    assert binary["accuracy"] == pytest.approx(np.trace(collapsed) / matrix.sum())
    assert len(metrics["reliability"]["calibrated"]) == 15
    report = (trained_run / "report.html").read_text()
    for heading in ("Confusion matrix", "Per class", "Calibration", "Most confidently wrong"):
        assert heading in report
    assert report.count("data:image/png;base64,") >= 2  # confusion + reliability figures


def test_linear_probe_trains_the_head_on_cached_features(shapes_dir: Path) -> None:
    from convtune.training.probe import linear_probe

    torch.manual_seed(0)
    model = create_model("test_resnet", 3, img_size=40)
    datamodule = small_datamodule(shapes_dir, model)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = model.head[-1].weight.clone()
    result = linear_probe(model, datamodule, replace(RECIPE, lr=0.1), epochs=3, seed=0)
    val_labels = torch.tensor(datamodule.images_in("val").labels)
    assert result.val_logits.shape == (len(val_labels), 3)
    expected = (result.val_logits.argmax(1) == val_labels).float().mean().item()
    assert result.history[-1]["val_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert [sorted(epoch) for epoch in result.history] == [
        ["train_loss", "val_accuracy", "val_loss"]
    ] * 3
    # The probe's val logits are the model's own on the val part's eval view.
    with torch.no_grad():
        model.eval()
        pixels = torch.stack([datamodule.eval_dataset("val")[i][0] for i in range(2)])
        torch.testing.assert_close(model(pixels), result.val_logits[:2], atol=1e-4, rtol=1e-4)
    for name, value in model.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[name]), name
    assert not torch.equal(model.head[-1].weight, head_before)


def test_the_probe_encodes_on_onnxruntime_as_torch_does(shapes_dir: Path) -> None:
    from convtune.training.probe import ONNX_MIN_IMAGES, encode, frozen_encoder

    torch.manual_seed(0)
    model = create_model("test_resnet", 3, img_size=40).to(memory_format=torch.channels_last)
    loader = small_datamodule(shapes_dir, model).eval_loader("val")
    random_state = torch.get_rng_state()
    on_onnxruntime = frozen_encoder(model, images=ONNX_MIN_IMAGES)
    assert torch.equal(torch.get_rng_state(), random_state)  # the training draws the same
    assert on_onnxruntime is not model.encoder
    assert frozen_encoder(model, images=ONNX_MIN_IMAGES - 1) is model.encoder
    features, labels = encode(on_onnxruntime, loader)
    expected, expected_labels = encode(model.encoder, loader)
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(labels, expected_labels)


def test_the_probe_encodes_with_torch_when_the_export_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from convtune.training import probe

    def unsupported(*_args, **_kwargs) -> None:
        raise RuntimeError("no ONNX translation for an operator")

    monkeypatch.setattr(probe, "write_graph", unsupported)
    model = create_model("test_resnet", 3, img_size=40)
    assert probe.frozen_encoder(model, images=probe.ONNX_MIN_IMAGES) is model.encoder
    assert "no ONNX translation for an operator" in caplog.text


def test_fit_with_cached_features_runs_only_the_unfrozen_epochs(
    shapes_dir: Path, tmp_path: Path, fit_args: list[str]
) -> None:
    args = [*fit_args, "--freeze-epochs", "1", "--cache-features", "--cache-images"]
    assert main(["fit", "--data", str(shapes_dir), "--out", str(tmp_path), *args]) == 0
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 0  # 2 epochs: 1 as the probe, 1 with Lightning
    assert json.loads((tmp_path / "model.json").read_text())["val_metrics"]["accuracy"] > 0.5


def test_the_best_checkpoint_is_the_best_epoch_by_the_monitored_metric(trained_run: Path):
    accuracy = logged(trained_run / "logs" / "version_0" / "metrics.csv", "val/accuracy")
    best_epoch, _, best_accuracy = max(accuracy, key=lambda row: (row[2], -row[0]))
    best = torch.load(trained_run / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["epoch"] == best_epoch
    description = json.loads((trained_run / "model.json").read_text())
    assert description["val_metrics"]["accuracy"] == pytest.approx(best_accuracy, abs=1e-6)


@pytest.fixture(scope="module")
def imbalanced_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small shapes dataset with few squares: 20 circles, 6 squares, 20 triangles."""
    root = make_shapes_dataset(tmp_path_factory.mktemp("imbalanced"), per_class=20, size=40,
                               seed=2)  # fmt: skip
    for path in sorted((root / "square").iterdir())[6:]:
        path.unlink()
    return root


@pytest.fixture(scope="module")
def small_runs(
    imbalanced_shapes: Path, tmp_path_factory: pytest.TempPathFactory, fit_args: list[str]
) -> dict[str, Path]:
    """One-epoch runs on the imbalanced shapes: seed 0 twice, seed 1 (on its own split and
    on seed 0's), and seed 0 with ``--class-weights auto``."""
    root = tmp_path_factory.mktemp("small-runs")
    variants = {"seed 0": [], "seed 0 again": [], "seed 1": ["--seed", "1"],
                "seed 1, seed 0's split": ["--seed", "1"],
                "class weights": ["--class-weights", "auto"]}  # fmt: skip
    runs = {name: root / f"run-{number}" for number, name in enumerate(variants)}
    for name, extra in variants.items():
        if name == "seed 1, seed 0's split":  # a split.json in the run directory is used
            runs[name].mkdir()
            shutil.copyfile(runs["seed 0"] / "split.json", runs[name] / "split.json")
        args = [*fit_args, "--epochs", "1", "--tta", "none", "--test-fraction", "0", *extra]
        out = str(runs[name])
        assert main(["fit", "--data", str(imbalanced_shapes), "--out", out, *args]) == 0
    return runs


def same_weights(run: Path, other: Path) -> bool:
    weights, others = (load_file(r / "model.safetensors") for r in (run, other))
    return weights.keys() == others.keys() and all(
        torch.equal(weights[k], others[k]) for k in weights
    )


def train_losses(run: Path) -> list[float]:
    return [loss for _, _, loss in logged(run / "logs" / "version_0" / "metrics.csv",
                                          "train/loss_step")]  # fmt: skip


def test_the_same_seed_gives_the_same_run_and_another_seed_another(small_runs) -> None:
    run, again, other = small_runs["seed 0"], small_runs["seed 0 again"], small_runs["seed 1"]
    assert (run / "split.json").read_text() == (again / "split.json").read_text()
    assert train_losses(run) == train_losses(again)
    assert same_weights(run, again)
    # The seed chooses the split, and with the split held the initial weights and the
    # augmentation (the first loss already differs).
    assert (run / "split.json").read_text() != (other / "split.json").read_text()
    assert not same_weights(run, other)
    same_split = small_runs["seed 1, seed 0's split"]
    assert (run / "split.json").read_text() == (same_split / "split.json").read_text()
    assert train_losses(run)[0] != train_losses(same_split)[0]
    assert not same_weights(run, same_split)


def test_class_weights_auto_weighs_classes_by_inverse_frequency(small_runs) -> None:
    run, weighted = small_runs["seed 0"], small_runs["class weights"]
    split = json.loads((weighted / "split.json").read_text())
    assert split == json.loads((run / "split.json").read_text())
    train_labels = [label for _, label in split["train"]]
    counts = np.array([train_labels.count(name) for name in split["classes"]])
    assert counts[1] < counts[0] == counts[2]  # few squares
    # The loss the run trained with (its checkpoint's recipe) weighs each class by
    # images / (classes x its images): the rare class most.
    for run_dir, expected in ((run, None), (weighted, len(train_labels) / (3 * counts))):
        path = run_dir / "checkpoints" / "last.ckpt"
        recipe = ClassifierModule.load_from_checkpoint(path, weights_only=True).recipe
        assert recipe.class_weights == (None if expected is None else pytest.approx(expected))
    # Same seed, same data: only the weighted loss made training differ.
    assert train_losses(run) != train_losses(weighted)
    assert not same_weights(run, weighted)


def test_early_stopping_ends_the_run_once_the_monitored_metric_stops_improving(
    imbalanced_shapes: Path, tmp_path: Path, fit_args: list[str]
) -> None:
    # A learning rate too small to move any weight, and BatchNorm statistics held: every
    # epoch's val loss is the first one's, so no epoch after the first improves on it.
    args = [*fit_args, "--epochs", "10", "--early-stopping", "2", "--monitor", "loss",
            "--lr", "1e-30", "--keep-bn-eval", "--tta", "none", "--test-fraction", "0"]  # fmt: skip
    assert main(["fit", "--data", str(imbalanced_shapes), "--out", str(tmp_path), *args]) == 0
    losses = logged(tmp_path / "logs" / "version_0" / "metrics.csv", "val/loss")
    assert [epoch for epoch, _, _ in losses] == [0, 1, 2]  # the first, then 2 without progress
    assert len({loss for _, _, loss in losses}) == 1
    # The checkpoint and the stopping watched the loss, lowest best: the first epoch's.
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["epoch"] == 0
    watched = {name.split("{")[0]: name for name in best["callbacks"]}
    for kind in ("ModelCheckpoint", "EarlyStopping"):
        assert "'monitor': 'val/loss', 'mode': 'min'" in watched[kind], watched
    checkpoint = best["callbacks"][watched["ModelCheckpoint"]]
    assert float(checkpoint["best_model_score"]) == pytest.approx(losses[0][2], rel=1e-6)


def test_fit_speaks_for_itself_without_lightning_chatter(
    shapes_dir: Path, tmp_path: Path, fit_args: list[str]
) -> None:
    # A process of its own: what a user's terminal shows, with Lightning's handlers as set
    # up at import and Python's default warning filters.
    args = [*fit_args, "--freeze-epochs", "1", "--freeze-stages", "1", "--tta", "none"]
    result = subprocess.run(
        [sys.executable, "-m", "convtune", "fit", "--data", str(shapes_dir),
         "--out", str(tmp_path), *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Encoder frozen for epochs 0-0" in result.stderr  # the run's own story stays
    for chatter in ("litlogger", "GPU available", "`Trainer.fit` stopped", "LeafSpec",
                    "in eval mode"):  # fmt: skip
        assert chatter not in result.stdout + result.stderr, chatter


def test_fit_uses_a_pre_split_tree_as_given(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, fit_args: list[str], capsys
) -> None:
    root = tmp_path_factory.mktemp("pre-split")
    make_shapes_dataset(root / "train", per_class=12, size=40, seed=4)
    make_shapes_dataset(root / "test", per_class=4, size=40, seed=5)
    # A copy within a class (kept with its original in one part), and a broken file.
    for copy in range(3):
        shutil.copy(
            root / "train" / "circle" / "0000.png", root / "train" / "circle" / f"c{copy}.png"
        )
    (root / "train" / "square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out, args = (
        str(tmp_path),
        [*fit_args, "--epochs", "1", "--tta", "none", "--val-fraction", "0.25"],
    )
    assert main(["fit", "--data", str(root), "--out", out, *args]) == 2
    assert f"{root}/train/square/broken.png" in capsys.readouterr().err
    assert main(["fit", "--data", str(root), "--out", out, *args, "--skip-bad-images"]) == 0
    err = capsys.readouterr().err
    assert "data: pre-split tree" in err and "images per class and split" in err
    assert "3 image(s) are exact copies of another in the same class" in err
    split = json.loads((tmp_path / "split.json").read_text())
    in_folder = {part: {Path(path).parts[-3] for path, _ in split[part]} for part in PARTS}
    # The test folder is the test part (not --test-fraction of the data); val is carved
    # from train, a quarter of each class, counting the copies as one image.
    assert in_folder == {"train": {"train"}, "val": {"train"}, "test": {"test"}}
    assert len(split["test"]) == 12 and len(split["val"]) == 9 and len(split["train"]) == 30
    copies = {
        str(root / "train" / "circle" / name) for name in ("0000.png", "c0.png", "c1.png", "c2.png")
    }
    holding = [part for part in PARTS if copies & {path for path, _ in split[part]}]
    assert len(holding) == 1
    assert all(Path(path).parent.name == label for path, label in split["test"])
    assert (tmp_path / "report.html").is_file()


def test_fit_refuses_copies_across_parts_unless_allowed(
    tmp_path: Path, fit_args: list[str], capsys
) -> None:
    make_shapes_dataset(tmp_path / "data" / "train", per_class=4, size=40, seed=4)
    make_shapes_dataset(tmp_path / "data" / "val", per_class=2, size=40, seed=5)
    leak = tmp_path / "data" / "val" / "square" / "leak.png"
    shutil.copy(tmp_path / "data" / "train" / "square" / "0001.png", leak)
    argv = ["fit", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *fit_args]
    assert main(argv) == 2
    assert f"(train) = {leak} (val). Remove the copies, or pass --allow-duplicates" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "run" / "split.json").exists()
