"""``bentoml build`` packs the service, its code and the model, without torch; the bento
runs as its container image would, from its own requirements only; and the image itself,
built on a base image made from Debian packages, serves the same answers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import image_file, largest_difference, post
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from convtune.benchmarks.servers import free_port, running_server
from convtune.models.artifact import read_manifest

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE_SCRIPT = REPO / "scripts" / "debian-base-image.sh"

pytestmark = pytest.mark.slow
TORCH_FAMILY = {"torch", "torchvision", "lightning", "pytorch-lightning", "timm"}
# Never in the service's environment: albumentations loads torch where it is installed.
NEVER_SERVED = {*TORCH_FAMILY, "albumentations"}


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


@dataclass(frozen=True)
class Bento:
    """The repository built into a bento, in a store that holds only the exported model."""

    tag: str
    home: Path  # the store's BENTOML_HOME
    path: Path  # the bento in that store: it refers to the model in the store
    context: Path  # `bentoml export` of it, unpacked: the bento with its model under models/


def build_bento(exported, home: Path, *options: str) -> str:
    """``bentoml build`` of the repository into the store at ``home``: the bento's tag."""
    env = {"BENTOML_HOME": str(home)}
    out = exported.run("-m", "bentoml", "build", *options, "--output", "tag", timeout=180, **env)
    return re.search(r"__tag__:(\S+)", out).group(1)


@pytest.fixture(scope="module")
def bento(exported, tmp_path_factory) -> Bento:
    root = tmp_path_factory.mktemp("bento")
    home = root / "bentoml"
    shutil.copytree(exported.bentoml_home / "models", home / "models", symlinks=True)
    env = {"BENTOML_HOME": str(home)}
    tag = build_bento(exported, home)
    # `bentoml export` packs the models as pushing and containerizing do (the image's
    # build context is the bento with its models under models/).
    archive = root / "convtune.bento"
    exported.run("-m", "bentoml", "export", tag, str(archive), timeout=180, **env)
    context = root / "context"
    with tarfile.open(archive) as tar:
        tar.extractall(context, filter="data")
    return Bento(tag, home, home / "bentos" / tag.replace(":", "/"), context)


def test_bentoml_build_packs_service_code_and_model(exported, bento) -> None:
    assert (bento.path / "env" / "docker" / "Dockerfile").is_file()
    for source in (
        "convtune/__init__.py",  # what makes the folders below importable as convtune.*
        "service/service.py",
        "service/routes.py",
        "service/http.py",
        "service/openapi.py",
        "service/ui/index.html",  # the pages' files (service.pages)
        "service/ui/ui.js",
        "data/images.py",
        "models/inference.py",
    ):
        assert (bento.path / "src" / source).is_file(), source
    assert not (bento.path / "src" / "training").exists()
    assert not (bento.path / "src" / "tests").exists()

    info = yaml.safe_load((bento.path / "bento.yaml").read_text())
    assert [m["tag"] for s in info["services"] for m in s["models"]] == [exported.tag]
    # The image installs what bentofile.yaml lists, and nothing that, however indirectly,
    # is torch or its family.
    wanted = requirements(bento.path / "env" / "python" / "requirements.txt")
    listed = yaml.safe_load((REPO / "bentofile.yaml").read_text())["python"]["packages"]
    assert {canonicalize_name(Requirement(r).name) for r in listed} <= {
        canonicalize_name(r.name) for r in wanted
    }
    installed = installed_closure(wanted)
    assert {"bentoml", "onnxruntime", "numpy", "pillow"} <= set(installed)
    assert not set(installed) & TORCH_FAMILY, sorted(installed)

    # A built bento refers to the model in the store; the exported one carries it. It must
    # arrive intact.
    assert (bento.context / "env" / "docker" / "Dockerfile").is_file()
    model_name, model_version = exported.tag.split(":")
    model_dir = bento.context / "models" / model_name / model_version
    assert read_manifest(model_dir).classes == exported.classes  # sha256 verified


# What the bento's generated Dockerfile does, which the test below does without Docker: if
# BentoML changes it, the test fails here first instead of testing something else.
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
IMAGE_STEPS = (
    f"FROM python:{PYTHON}-slim",  # the Python version of this environment
    f"uv venv --python {PYTHON} /app/.venv",  # a fresh virtual environment
    'INSTALL_ROOT="./src"',  # the requirements install from the bento's src/
    "pip install -r $BENTO_PATH/env/python/requirements.txt",  # and only those
    "COPY --chown=bentoml:bentoml . ./",  # then the bento, its models included
    "WORKDIR $BENTO_PATH",
    'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]',
)
# The entrypoint activates /app/.venv, else .venv in the working directory, and runs this
# when given only options.
ENTRYPOINT_SERVES = 'set -- bentoml serve "$@" "$BENTO_PATH"'
IMAGE_PATHS = ("/home/bentoml/bento", "/home/bentoml/", "/app/.venv")  # moved by the test


def image_environment(dockerfile: str, moved: Mapping[str, str]) -> dict[str, str]:
    """The variables a Dockerfile's ENV lines set, with its ARG defaults and earlier values
    substituted, and each of the image's paths that ``moved`` names replaced by its value."""
    values = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    environment = {}
    for kind, name, value in re.findall(r"^(ARG|ENV) (\w+)=(.*)$", dockerfile, re.MULTILINE):
        value = re.sub(r"\$\{?(\w+)\}?", lambda match: values.get(match[1], ""), value)
        for image_path, path in moved.items():
            value = value.replace(image_path, path)
        values[name] = value
        if kind == "ENV":
            environment[name] = value
    return environment


def bento_environment(bento: Path, *, home: Path) -> tuple[dict[str, str], float]:
    """A virtual environment at ``bento/.venv`` made as the bento's Dockerfile makes the
    image's, and the variables the image sets, with the image's paths moved to ``bento``,
    ``home`` and that environment; and the seconds its creation took."""
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    venv = bento / ".venv"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # pip's own settings (an index, a mirror) pass through; nothing of this checkout does.
    pip_env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    requirements_txt = bento / "env" / "python" / "requirements.txt"
    pip = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "-r", requirements_txt],
        cwd=bento / "src",
        env=pip_env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert pip.returncode == 0, f"pip install -r {requirements_txt} failed:\n{pip.stderr}"
    seconds = time.monotonic() - started
    moved = dict(zip(IMAGE_PATHS, (str(bento), f"{home}/", str(venv)), strict=True))
    return {"HOME": str(home), **image_environment(dockerfile, moved)}, seconds


def distributions(
    python: Sequence[str | Path], env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> dict[str, list[str]]:
    """The distributions installed for the Python that the command ``python`` runs, and which
    of the never-served modules and convtune it can import, from ``cwd``."""
    code = (
        "import importlib.metadata as m, importlib.util as u, json, sys; "
        "print(json.dumps({'installed': [d.metadata['Name'] for d in m.distributions()], "
        "'importable': [n for n in sys.argv[1:] if u.find_spec(n)]}))"
    )
    modules = ["torch", "torchvision", "lightning", "pytorch_lightning", "timm"]
    args = [*python, "-c", code, *modules, "albumentations", "convtune"]
    out = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def assert_serves_only(found: dict[str, list[str]]) -> None:
    """What :func:`distributions` found is the service's environment: its packages, never
    torch or its family, and not convtune (the service runs from the bento's src/)."""
    installed = {canonicalize_name(name) for name in found["installed"]}
    assert {"bentoml", "onnxruntime", "opencv-python-headless", "pillow"} <= installed
    assert not installed & NEVER_SERVED, sorted(installed)
    assert found["importable"] == [], found


def predictions(url: str, images: list[Path]) -> list[dict]:
    """``/predict`` of each image with every class, one request at a time."""
    results = []
    for path in images:
        response = post(url, "predict", files={"image": image_file(path)}, data={"top_k": "99"})
        assert response.status_code == 200, response.text
        results.append(response.json())
    return results


def docker_missing() -> str | None:
    """Why no image can be built and run here, or None where a Docker engine answers and
    debootstrap can make the base image."""
    if shutil.which("docker") is None:
        return "no `docker` command"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return f"`docker info` failed: {(info.stderr.strip() or 'no message').splitlines()[-1]}"
    if shutil.which("debootstrap") is None:
        return f"no `debootstrap`, which {BASE_IMAGE_SCRIPT.relative_to(REPO)} needs"
    return None


def command_output(command: Sequence[str | Path], timeout: float = 120) -> str:
    """``command``'s stdout; the test fails with its stderr if it fails."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stderr}"
    return result.stdout.strip()


def debian_bento(exported, bento: Bento, root: Path) -> str:
    """The repository built into a bento whose image starts from the Debian base image, as
    a machine without Docker Hub builds it: bentofile.yaml with ``docker.base_image`` set.
    The base image is made once and then reused. The bento's tag."""
    base_image = command_output([BASE_IMAGE_SCRIPT], timeout=600)
    config = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    config["docker"]["base_image"] = base_image
    bentofile = root / "bentofile.yaml"
    bentofile.write_text(yaml.safe_dump(config))
    return build_bento(exported, bento.home, "-f", str(bentofile))


def containerize(exported, bento: Bento, tag: str, image: str) -> None:
    """``bentoml containerize`` the bento ``tag`` as ``image``; its build's steps use the
    host's network, through which this machine reaches PyPI and Debian."""
    env = {"BENTOML_HOME": str(bento.home)}
    # Docker 23 and later build with BuildKit only through the buildx plugin, which Debian's
    # docker.io lacks: there the classic builder builds the same Dockerfile, less its cache
    # mounts.
    if subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode != 0:
        env["DOCKER_BUILDKIT"] = "0"
    exported.run(
        "-m", "bentoml", "containerize", tag, "-t", image, "--opt", "network=host",
        timeout=1200, **env,
    )  # fmt: skip


@contextmanager
def running_container(image: str, model: str, log: Path) -> Iterator[tuple[str, str]]:
    """``image`` serving ``model`` on a free port of 127.0.0.1 until the block ends: its
    base URL and the container's name. The container is removed after."""
    name = f"convtune-test-{uuid.uuid4().hex[:12]}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = ["docker", "run", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:3000",
               "-e", f"CONVTUNE_MODEL={model}", image]  # fmt: skip
    try:
        with running_server(command, ready_url=f"{url}/readyz", log_path=log, env=os.environ):
            yield url, name
    finally:  # where stopping `docker run` did not stop its container
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)


def server_uids(container: str) -> set[int]:
    """The real, effective, saved and filesystem user ids of the server in ``container``:
    its first process (the entrypoint execs ``bentoml serve``), which starts the workers."""
    status = command_output(["docker", "exec", container, "cat", "/proc/1/status"])
    return {int(uid) for uid in re.search(r"^Uid:(.*)$", status, re.MULTILINE)[1].split()}


def assert_image_serves(
    exported, bento: Bento, probe_images, cli_results, tmp_path: Path, capsys
) -> None:
    """Build the image of a bento on the Debian base image, run it, and get the CLI's
    answers from it, served by a user other than root, with no torch in the image."""
    tag = debian_bento(exported, bento, tmp_path)
    image = f"convtune-test:{tag.split(':')[1]}"
    started = time.monotonic()
    containerize(exported, bento, tag, image)
    seconds = time.monotonic() - started
    try:
        size = int(command_output(["docker", "image", "inspect", "-f", "{{.Size}}", image]))
        with capsys.disabled():  # for docs/benchmarks.md
            print(f"the bento's image: {seconds:.0f} s to build, {size / 2**20:.0f} MiB")
        python = ["docker", "run", "--rm", "--entrypoint", "python", "-w", "/", image]
        assert_serves_only(distributions(python))
        with running_container(image, exported.tag, tmp_path / "image.log") as (url, name):
            assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
            assert largest_difference(predictions(url, probe_images), cli_results) <= 1e-6
            assert 0 not in server_uids(name)
    finally:  # the base image stays, for the next run
        subprocess.run(["docker", "rmi", "-f", image], capture_output=True, timeout=120)


def assert_environment_serves(
    exported, bento: Bento, probe_images, cli_results, tmp_path: Path, capsys
) -> None:
    """Serve the bento from an environment made as its Dockerfile makes the image's, with
    the entrypoint the image runs, and get the CLI's answers from it."""
    home = tmp_path / "home"  # the image's BENTOML_HOME: no models but the bento's own
    home.mkdir()
    env, seconds = bento_environment(bento.context, home=home)
    env["CONVTUNE_MODEL"] = exported.tag
    python = bento.context / ".venv" / "bin" / "python"

    assert_serves_only(distributions([python], env, cwd=tmp_path))
    site_packages = python.parents[1] / "lib" / f"python{PYTHON}" / "site-packages"
    mib = sum(f.stat().st_size for f in site_packages.rglob("*") if f.is_file()) / 2**20
    with capsys.disabled():  # for docs/benchmarks.md
        print(f"\nthe bento's environment: {seconds:.0f} s to make, site-packages {mib:.0f} MiB")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    entrypoint = ["bash", "env/docker/entrypoint.sh", "--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path / "serve.log"
    with running_server(
        entrypoint, ready_url=f"{url}/readyz", log_path=log, env=env, cwd=bento.context
    ):
        results = predictions(url, probe_images)
    assert {result["model"] for result in results} == {exported.tag}
    assert largest_difference(results, cli_results) <= 1e-6
    assert "Service loaded from Bento directory" in log.read_text()


def test_the_bento_dockerfile_builds_what_the_environment_test_makes(bento) -> None:
    """The steps :func:`bento_environment` repeats without Docker are still the image's."""
    dockerfile = (bento.context / "env" / "docker" / "Dockerfile").read_text()
    for step in IMAGE_STEPS:
        assert step in dockerfile, f"the bento's Dockerfile no longer has {step!r}"
    entrypoint = (bento.context / "env" / "docker" / "entrypoint.sh").read_text()
    assert ENTRYPOINT_SERVES in entrypoint


@pytest.mark.timeout(1800)  # building an image takes minutes where Docker runs
def test_the_bento_serves_as_its_image_would(
    exported, bento, probe_images, cli_results, tmp_path, capsys
) -> None:
    """Where Docker runs, the image itself is built and run. Elsewhere the bento is served
    as the image would serve it, and the test then skips the image, saying why: under CI
    that fails (tests/conftest.py), since CI must build the image."""
    if reason := docker_missing():
        assert_environment_serves(exported, bento, probe_images, cli_results, tmp_path, capsys)
        pytest.skip(f"the bento served from its own environment; no image built: {reason}")
    assert_image_serves(exported, bento, probe_images, cli_results, tmp_path, capsys)
