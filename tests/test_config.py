"""The fit configuration has one source, FitConfig: its flags, their help, the YAML keys,
``--print-config`` and the head, augmentation and recipe built from it."""

from __future__ import annotations

import logging
import re
import sys
import types
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import yaml

from convtune.data.transforms import Augmentation
from convtune.models.factory import HeadConfig
from convtune.training.cli import main
from convtune.training.config import FitConfig, command_line_options, option_names
from convtune.training.module import Recipe

REQUIRED = ["--data", "photos", "--model", "test_resnet", "--out", "runs/photos"]

# The command-line contract: every flag `convtune fit` has had, valued ones and switches.
VALUED_FLAGS = [
    "data", "model", "out", "pretrained", "epochs", "img-size", "eval-img-size", "crop-pct",
    "crop-mode", "batch-size", "freeze-epochs", "lr", "backbone-lr-scale", "optimizer",
    "momentum", "weight-decay", "warmup-epochs", "label-smoothing", "class-weights",
    "head-hidden", "head-dropout", "head-activation", "aug-scale-min", "hflip", "vflip",
    "affine-scale", "affine-shift", "affine-rotate", "color-jitter", "val-data", "test-data",
    "val-fraction", "test-fraction", "path-column", "label-column", "label-separator", "label-map",
    "binary-negative", "freeze-stages", "ema-decay", "tta", "time-limit", "monitor",
    "early-stopping", "num-workers", "precision", "accelerator", "devices", "strategy",
    "num-nodes", "logger", "seed",
]  # fmt: skip
SWITCHES = {  # flag: the FitConfig field it flips
    "--no-header": "label_header",
    "--skip-bad-images": "skip_bad_images",
    "--allow-duplicates": "allow_duplicates",
    "--cache-images": "cache_images",
    "--keep-bn-eval": "keep_bn_eval",
    "--cache-features": "cache_features",
    "--no-random-crop": "random_crop",
    "--rotate90": "rotate90",
    "--no-bn-recalibrate": "bn_recalibrate",
    "--compile": "compile",
}


def fit_help(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> dict:
    """``convtune fit --help`` as {flag: its help text}."""
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: argparse wraps at the terminal's width
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out.split("options:", 1)[1]
    entries = (" ".join(entry.split()) for entry in re.split(r"\n  (?=--)", text))
    matches = (re.fullmatch(r"(--[\w-]+)(?: [A-Z_0-9]+)? (.*)", entry) for entry in entries)
    return {match[1]: match[2] for match in matches if match}


def print_config(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["fit", *args, "--print-config"]) == 0
    return capsys.readouterr().out


def test_every_field_is_a_flag_and_every_flag_a_field(capsys, monkeypatch) -> None:
    helps = fit_help(capsys, monkeypatch)
    flags = {"--" + flag for flag in VALUED_FLAGS} | set(SWITCHES)
    assert flags == set(helps) - {"--config", "--resume", "--print-config"}
    fields_set = {flag[2:].replace("-", "_") for flag in flags - set(SWITCHES)}
    assert fields_set | set(SWITCHES.values()) == set(option_names())


def test_the_help_shows_each_default_of_the_dataclass(capsys, monkeypatch) -> None:
    helps = fit_help(capsys, monkeypatch)
    for spec in fields(FitConfig):
        flag = "--" + spec.name.replace("_", "-")
        if spec.default is MISSING or spec.name in SWITCHES.values():  # no default shown
            continue
        shown = re.findall(r"\[([^]]+)\]$", helps[flag])
        assert shown, f"{flag} shows no default: {helps[flag]!r}"
        if spec.default is not None:  # else: what None means, in words
            value = shown[0].replace("\\t", "\t")
            assert type(spec.default)(value) == spec.default, (flag, shown)
    assert helps["--lr"].endswith(f"[{FitConfig.lr}]")
    assert helps["--optimizer"].endswith("sgd | adamw [sgd]")


def test_each_switch_flips_its_fields_default(capsys) -> None:
    printed = yaml.safe_load(print_config([*REQUIRED, *SWITCHES], capsys))
    for name in SWITCHES.values():
        assert printed[name] is not getattr(FitConfig, name), name


def test_print_config_round_trips_through_config(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    args = [*REQUIRED, "--out", str(run_dir), "--epochs", "7", "--lr", "0.003", "--crop-pct", "0.9",
            "--label-separator", "\t", "--label-map", "0.0=ok,1.0=bad",
            "--binary-negative", "ok", "--no-random-crop", "--time-limit", "60"]  # fmt: skip
    printed = print_config(args, capsys)
    expected = FitConfig(
        data="photos", model="test_resnet", out=str(run_dir), epochs=7, lr=0.003,
        crop_pct=0.9, label_separator="\t", label_map={"0.0": "ok", "1.0": "bad"},
        binary_negative=["ok"], random_crop=False, time_limit=60.0,
    )  # fmt: skip
    assert yaml.safe_load(printed) == expected.to_dict()
    assert list(yaml.safe_load(printed)) == option_names()  # every key, in field order
    config_file = tmp_path / "run.yaml"
    config_file.write_text(printed)
    assert print_config(["--config", str(config_file)], capsys) == printed
    assert not run_dir.exists()  # printing trains nothing


def test_flags_override_the_yaml_file(tmp_path: Path, capsys) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text("data: photos\nmodel: test_resnet\nout: o\nepochs: 7\nbatch-size: 4\n")
    printed = yaml.safe_load(print_config(["--config", str(config_file), "--epochs", "3"], capsys))
    assert (printed["epochs"], printed["batch_size"], printed["lr"]) == (3, 4, FitConfig.lr)


def test_an_unknown_yaml_key_is_an_error(tmp_path: Path, capsys) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text("data: photos\nmodel: test_resnet\nout: o\nepochz: 3\n")
    assert main(["fit", "--config", str(config_file), "--print-config"]) == 2
    assert "unknown option(s) ['epochz']" in capsys.readouterr().err


def test_a_value_outside_the_choices_is_refused(capsys) -> None:
    assert main(["fit", *REQUIRED, "--optimizer", "adam", "--print-config"]) == 2
    assert "invalid setting(s): optimizer='adam'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *REQUIRED, "--label-map", "no-pairs", "--print-config"])
    assert exit_info.value.code == 2
    assert "argument --label-map: invalid parse_label_map value" in capsys.readouterr().err


def test_head_augmentation_and_recipe_take_their_settings_from_the_config() -> None:
    config = FitConfig(data="d", model="m", out="o", head_hidden=8, aug_scale_min=0.5, lr=0.3)
    assert HeadConfig(**config.head_kwargs()).hidden_features == 8
    assert Augmentation(**config.augmentation_kwargs()).scale == (0.5, 1.0)
    recipe = Recipe(**config.recipe_kwargs())
    assert (recipe.lr, recipe.momentum) == (0.3, FitConfig.momentum)
    # No defaults of their own to drift from FitConfig's.
    for component in (HeadConfig, Recipe):
        assert all(spec.default is MISSING for spec in fields(component)), component
    configured = set(config.augmentation_kwargs())
    assert all(spec.default is MISSING for spec in fields(Augmentation) if spec.name in configured)


def test_bench_passes_every_argument_to_the_benchmarks(monkeypatch) -> None:
    received = []
    benchmarks = types.ModuleType("convtune.benchmarks.cli")
    benchmarks.main = lambda argv: received.append(argv) or 3
    monkeypatch.setitem(sys.modules, "convtune.benchmarks.cli", benchmarks)
    assert main(["bench", "serve", "--help"]) == 3
    assert main(["bench", "--help"]) == 3
    assert main(["bench", "train", "--rounds", "1", "--", "x"]) == 3
    assert received == [["serve", "--help"], ["--help"], ["train", "--rounds", "1", "--", "x"]]


def test_bench_without_the_benchmarks_says_how_to_get_them(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "convtune.benchmarks.cli", None)  # as in a wheel
    assert main(["bench", "serve"]) == 2
    message = capsys.readouterr().err
    assert "source checkout" in message and "pip install -e '.[dev]'" in message


def test_each_call_logs_to_the_stderr_of_its_time_and_leaves_no_handler(
    tmp_path: Path, capsys
) -> None:
    logger = logging.getLogger("convtune")
    handlers = list(logger.handlers)
    for _ in range(2):
        # An error path that logs nothing, then a fit that logs: both leave nothing behind.
        assert main(["fit", "--data", str(tmp_path / "absent"), "--model", "x", "--out",
                     str(tmp_path / "run")]) == 2  # fmt: skip
        assert logger.handlers == handlers
    assert "error:" in capsys.readouterr().err


def test_the_defaults_the_readme_quotes_are_the_dataclass_defaults() -> None:
    options = {option.flag: option for option in command_line_options()}
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    quoted = re.findall(r"`(--[a-z0-9-]+)[^`]*`\s+\[([^\]]+)\]", readme)
    checked = 0
    for flag, text in quoted:
        option = options.get(flag)
        if option is None or option.default is None:
            continue  # another command's flag, or a default that depends on the model
        shown = re.search(r"\[([^\]]+)\]$", option.help).group(1)
        assert re.split(r",| = ", text)[0].strip() == shown, (flag, text, shown)
        checked += 1
    assert checked >= 10
