"""``bentoml build`` packs the service, its code and the model, without torch."""

from __future__ import annotations

import re
import shutil
import tarfile

import pytest
import yaml

from convtune.models.artifact import read_manifest

pytestmark = pytest.mark.slow
TORCH_FAMILY = {"torch", "torchvision", "lightning", "pytorch-lightning", "timm"}


def requirement_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[\s\[<>=!~;@]", line)[0].lower().replace("_", "-"))
    return names


def test_bentoml_build_packs_service_code_and_model(exported, tmp_path) -> None:
    home = tmp_path / "bentoml"  # a fresh store that holds only the exported model
    shutil.copytree(exported.bentoml_home / "models", home / "models", symlinks=True)
    env = {"BENTOML_HOME": str(home)}

    out = exported.run("-m", "bentoml", "build", "--output", "tag", timeout=180, **env)
    bento_tag = re.search(r"__tag__:(\S+)", out).group(1)
    name, version = bento_tag.split(":")
    bento = home / "bentos" / name / version
    assert (bento / "env" / "docker" / "Dockerfile").is_file()
    for source in (
        "service/service.py",
        "service/http.py",
        "service/openapi.py",
        "data/images.py",
        "models/inference.py",
    ):
        assert (bento / "src" / source).is_file(), source
    assert not (bento / "src" / "training").exists()
    assert not (bento / "src" / "tests").exists()

    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert [m["tag"] for s in info["services"] for m in s["models"]] == [exported.tag]
    requirements = requirement_names((bento / "env/python/requirements.txt").read_text())
    assert {"bentoml", "onnxruntime", "albumentations", "numpy", "pillow"} <= requirements
    assert not requirements & TORCH_FAMILY, requirements

    # A built bento refers to the model in the store; `bentoml export` (what pushing and
    # containerizing start from) packs it under models/. It must arrive intact.
    archive = tmp_path / "convtune.bento"
    exported.run("-m", "bentoml", "export", bento_tag, str(archive), timeout=180, **env)
    model_name, model_version = exported.tag.split(":")
    unpacked = tmp_path / "unpacked"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    assert (unpacked / "env" / "docker" / "Dockerfile").is_file()
    model_dir = unpacked / "models" / model_name / model_version
    assert read_manifest(model_dir).classes == exported.classes  # sha256 verified
