"""Where an encoder's pretrained weights come from.

``none``: random init. ``hub``: timm's own download (needs a network). A path to a
``.safetensors`` or ``.pth`` state dict: loaded through timm's ``pretrained_cfg_overlay``
so timm's own key filters run, a mismatched classifier is dropped, and the model keeps
its pretrained data config (mean, std, crop). ``.pth`` files load with
``weights_only=True`` (timm's default), so a pickled file cannot run code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class WeightsError(ValueError):
    """Pretrained weights were asked for but cannot be provided; the message says how."""


@dataclass(frozen=True)
class WeightSource:
    kind: str  # "none" | "hub" | "file"
    file: Path | None = None

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model`` that load these weights."""
        if self.kind == "none":
            return {"pretrained": False}
        if self.kind == "hub":
            return {"pretrained": True}
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(self.file)}}

    def describe(self) -> str:
        return str(self.file) if self.kind == "file" else self.kind


def resolve_weight_source(spec: str | Path) -> WeightSource:
    """Parse ``--pretrained``: ``none``, ``hub`` or a path to a local state-dict file."""
    text = str(spec)
    if text in ("none", "hub"):
        return WeightSource(text)
    path = Path(text).expanduser()
    if path.suffix.lower() not in WEIGHT_FILE_SUFFIXES:
        raise WeightsError(
            f"--pretrained {text!r} is neither 'none', 'hub' nor a weight file "
            f"({', '.join(WEIGHT_FILE_SUFFIXES)})"
        )
    if not path.is_file():
        raise WeightsError(f"pretrained weight file {path} does not exist")
    return WeightSource("file", path.resolve())


def offline_hint(model_name: str) -> str:
    return (
        f"could not download pretrained weights for {model_name!r} (no network?). To run "
        "offline, pass --pretrained FILE with a local .safetensors/.pth state dict, or "
        "--pretrained none to train from scratch."
    )
