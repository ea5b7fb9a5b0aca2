"""``bentoml build`` packs the service, its code and the model, without torch."""

from __future__ import annotations

import re
import shutil
import tarfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from convtune.models.artifact import read_manifest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow
TORCH_FAMILY = {"torch", "torchvision", "lightning", "pytorch-lightning", "timm"}


def requirements(path: Path) -> list[Requirement]:
    """The requirements a pip requirements file installs, following ``-r`` includes.

    Anything else pip could install from (``-e``, a path, a URL, an index option) fails the
    test: it would install packages this check cannot see.
    """
    found = []
    for line in path.read_text().splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if include := re.fullmatch(r"(?:-r|--requirement)[\s=]+(\S+)", line):
            found += requirements(path.parent / include.group(1))
            continue
        assert not line.startswith("-"), f"{path}: cannot check {line!r}"
        requirement = Requirement(line)
        assert requirement.url is None, f"{path}: cannot check {line!r}"
        found.append(requirement)
    return found


def installed_closure(wanted: list[Requirement]) -> dict[str, set[str]]:
    """Every distribution ``wanted`` installs, directly or through dependencies, with the
    extras asked of it: the requirements of the installed distributions, walked."""
    closure: dict[str, set[str]] = {}
    pending = list(wanted)
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        extras = set(requirement.extras)
        if name in closure and extras <= closure[name]:
            continue
        closure[name] = closure.get(name, set()) | extras
        for text in metadata.requires(name) or []:
            dependency = Requirement(text)
            environments = [{"extra": extra} for extra in closure[name] or {""}]
            if dependency.marker is None or any(map(dependency.marker.evaluate, environments)):
                pending.append(dependency)
    return closure


def test_the_dependency_walk_sees_a_package_pulled_in_indirectly() -> None:
    # torchmetrics (a dev dependency, through lightning) needs torch: the walk must say so.
    closure = installed_closure([Requirement("torchmetrics")])
    assert "torch" in closure and "torchmetrics" in closure


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
        "convtune/__init__.py",  # what makes the folders below importable as convtune.*
        "service/service.py",
        "service/http.py",
        "service/openapi.py",
        "service/ui/index.html",  # the pages' files (service.pages)
        "service/ui/ui.js",
        "data/images.py",
        "models/inference.py",
    ):
        assert (bento / "src" / source).is_file(), source
    assert not (bento / "src" / "training").exists()
    assert not (bento / "src" / "tests").exists()

    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert [m["tag"] for s in info["services"] for m in s["models"]] == [exported.tag]
    # The image installs what bentofile.yaml lists, and nothing that, however indirectly,
    # is torch or its family.
    wanted = requirements(bento / "env" / "python" / "requirements.txt")
    listed = yaml.safe_load((REPO / "bentofile.yaml").read_text())["python"]["packages"]
    assert {canonicalize_name(Requirement(r).name) for r in listed} <= {
        canonicalize_name(r.name) for r in wanted
    }
    installed = installed_closure(wanted)
    assert {"bentoml", "onnxruntime", "numpy", "pillow"} <= set(installed)
    assert not set(installed) & TORCH_FAMILY, sorted(installed)

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
