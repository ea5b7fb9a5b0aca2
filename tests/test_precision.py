"""How fast the training step runs on this machine: ``--precision auto`` decides from the
CPU's features, and ``--compile`` is refused up front where torch.compile cannot work."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch._inductor import config as inductor_config
from torch.utils.data import DataLoader, TensorDataset

from convtune.models.factory import create_model
from convtune.training.cli import main
from convtune.training.compilation import compile_problem
from convtune.training.config import FitConfig
from convtune.training.devices import (
    NATIVE_BF16_CPU_FEATURES,
    choose_precision,
    cpu_precision,
)
from convtune.training.module import ClassifierModule, Recipe

# torch.cpu.get_capabilities() of two real kinds of CPU, cut to the features that matter.
AVX2_EPYC = {"architecture": "x86_64", "avx": True, "avx2": True, "fma3": True, "f16c": True}
SAPPHIRE_RAPIDS = {
    **AVX2_EPYC, "avx512_f": True, "avx512_vnni": True, "avx512_bf16": True,
    "amx_tile": True, "amx_bf16": True,
}  # fmt: skip


def test_auto_trains_in_fp32_on_a_cpu_without_native_bf16() -> None:
    choice = cpu_precision(AVX2_EPYC)
    assert choice.precision == "32-true"
    assert str(choice) == "32-true (this CPU has no native bf16)"


def test_auto_trains_in_bf16_where_the_cpu_computes_it_natively() -> None:
    choice = cpu_precision(SAPPHIRE_RAPIDS)
    assert str(choice) == "bf16-mixed (this CPU has native bf16: avx512_bf16, amx_bf16)"
    amx_only = {**SAPPHIRE_RAPIDS, "avx512_bf16": False}
    assert cpu_precision(amx_only).precision == "bf16-mixed"
    # AVX-512 without its BF16 extension (Skylake, Ice Lake) only emulates bf16.
    skylake = {**SAPPHIRE_RAPIDS, "avx512_bf16": False, "amx_bf16": False}
    assert cpu_precision(skylake).precision == "32-true"


@pytest.mark.parametrize(
    ("capabilities", "expected"), [(AVX2_EPYC, "32-true"), (SAPPHIRE_RAPIDS, "bf16-mixed")]
)
@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_auto_on_the_cpu_asks_torch_for_the_cpus_features(
    monkeypatch: pytest.MonkeyPatch, accelerator: str, capabilities: dict, expected: str
) -> None:
    # No GPU: accelerator auto falls to the CPU, as Lightning's does.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert choose_precision("auto", accelerator=accelerator).precision == expected


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_on_a_gpu_takes_bf16_where_the_gpu_supports_it(
    monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    for accelerator in ("gpu", "auto"):
        assert choose_precision("auto", accelerator=accelerator).precision == expected


def test_torch_names_the_native_bf16_features_as_the_kernel_does() -> None:
    """The rule looks the features up by /proc/cpuinfo's names in torch's capabilities: a
    name torch spelled otherwise would read as absent, and fp32 would be chosen on every
    CPU. On this machine, each is present in both or in neither."""
    cpuinfo = Path("/proc/cpuinfo")
    capabilities = torch.cpu.get_capabilities()
    if not cpuinfo.is_file() or capabilities.get("architecture") != "x86_64":
        pytest.skip("needs an x86-64 Linux machine to compare /proc/cpuinfo with")
    line = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
    flags = set(line.split(":", 1)[1].split())
    for feature in NATIVE_BF16_CPU_FEATURES:
        assert capabilities[feature] == (feature in flags), (feature, sorted(flags))


def test_a_precision_asked_for_is_kept() -> None:
    choice = choose_precision("bf16-mixed", accelerator="cpu")
    assert str(choice) == "bf16-mixed (set by --precision)"


def test_compile_without_a_cxx_compiler_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    # Where inductor looks for its compiler ($CXX, else g++), a name no machine has.
    with inductor_config.patch({"cpp.cxx": (None, "convtune-no-such-c++")}):
        problem = compile_problem(on_cpu=True)
        status = main(
            ["fit", "--data", str(tmp_path / "no-data"), "--model", "test_resnet",
             "--out", str(run_dir), "--accelerator", "cpu", "--compile"]
        )  # fmt: skip
    assert problem is not None and "tried: convtune-no-such-c++" in problem, problem
    error = capsys.readouterr().err
    assert status == 2
    assert "convtune fit: error: --compile: torch.compile on the CPU needs a C++ compiler" in error
    assert not run_dir.exists()  # refused before the run directory, data or model


def test_compile_is_available_where_inductor_finds_a_compiler() -> None:
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile does not support this Python")
    assert compile_problem(on_cpu=True) is None


def test_the_compiled_steps_compile_once_not_at_every_step(tmp_path: Path) -> None:
    # Lightning's way (training.compilation), with dynamo's backend that runs the captured
    # graphs as they are: inductor's code generation would take minutes on a small CPU,
    # and what makes a step recompile (its guards) is the same.
    torch._dynamo.reset()
    model = create_model("test_resnet", 3, pretrained="none", img_size=32)
    module = ClassifierModule(model, Recipe(**FitConfig(data="", model="", out="").recipe_kwargs()))
    keys = set(module.state_dict())
    generator = torch.Generator().manual_seed(0)
    batches = TensorDataset(torch.randn(12, 3, 32, 32, generator=generator), torch.arange(12) % 3)
    loader = DataLoader(batches, batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with torch._dynamo.config.patch(error_on_recompile=True):  # a second compile fails
        trainer.fit(torch.compile(module, backend="eager"), loader, loader)
    assert module._compiler_ctx is not None  # the trainer ran the compiled steps
    assert trainer.global_step == 3 and "val/accuracy" in trainer.callback_metrics
    assert set(module.state_dict()) == keys  # checkpoints keep the module's own names
