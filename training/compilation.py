"""``--compile``: torch.compile for training, applied the Lightning way, and whether this
machine can run it.

Lightning's way is to hand ``trainer.fit`` the output of ``torch.compile(module)``: the
trainer unwraps it and compiles the module's ``forward`` and ``*_step`` methods in place
(``lightning.pytorch.utilities.compile.from_compiled``), so its state dict, checkpoints and
callbacks see the module's own parameters under their own names. Compiling happens at the
first step of each kind (training, validation, frozen and unfrozen encoder), not here; the
module keeps its metrics and logging out of the compiled steps (training/module.py).

On the CPU, inductor generates C++ and builds it with the machine's C++ compiler against
Python's headers. Without either, the first training step would fail after the data checks,
the split and the frozen phase, so fit asks :func:`compile_problem` before any work.
"""

from __future__ import annotations

import logging
import sysconfig
from pathlib import Path
from typing import Any

import lightning as L
import torch


def compile_problem(*, on_cpu: bool) -> str | None:
    """Why ``torch.compile`` cannot train here, as a sentence saying what to do; None
    when it can. Only the CPU's needs are checked: on GPUs torch's own errors say more."""
    try:
        torch._dynamo.eval_frame.check_if_dynamo_supported()
    except RuntimeError as error:
        return f"torch.compile does not run here ({error}); leave --compile off"
    if not on_cpu:
        return None
    from torch._inductor import config as inductor_config
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        searched = ", ".join(name for name in inductor_config.cpp.cxx if name)
        return (
            f"torch.compile on the CPU needs a C++ compiler and found none (tried: {searched}): "
            "install g++ or set CXX to one, or leave --compile off"
        )
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        return (
            f"torch.compile on the CPU needs Python's C headers and {headers} does not exist: "
            "install your Python's development package (e.g. python3-dev), or leave --compile off"
        )
    return None


def compiled_for_training(module: L.LightningModule) -> Any:
    """``module`` ready to be compiled by ``trainer.fit`` (see the module's docstring)."""
    # Building the C++ kernels warns on machines without CUDA that it found no CUDA
    # runtime, which a CPU run never needs.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return torch.compile(module)
