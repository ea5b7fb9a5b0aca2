"""The wheel installs one top-level name, ``convtune``, and works outside the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD_LITTER = (".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".*_cache")


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info/ into the tree it builds.
    source = out / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*BUILD_LITTER))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = out.glob("convtune-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def run_python(site: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    # The wheel's folder first on the path and a working directory outside the checkout, so
    # nothing of the repository can stand in for what the wheel lacks.
    return subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_wheel_holds_only_the_convtune_package(unpacked_wheel: Path) -> None:
    top_level = {path.name for path in unpacked_wheel.iterdir()}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"convtune"}
    package = unpacked_wheel / "convtune"
    assert {p.name for p in package.iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        "data",
        "models",
        "training",
        "service",
    }
    assert (package / "service" / "service.py").is_file()
    assert not list(unpacked_wheel.rglob("benchmarks"))


def test_the_installed_subpackages_come_from_the_wheel(
    unpacked_wheel: Path, tmp_path: Path
) -> None:
    result = run_python(
        unpacked_wheel,
        "import convtune, convtune.data.images, convtune.models.artifact\n"
        "print(convtune.data.images.__file__)\n"
        "print(len(convtune.__path__))\n"
        "try:\n"
        "    import convtune.benchmarks\n"
        "except ModuleNotFoundError:\n"
        "    print('no benchmarks')\n",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    images_file, path_entries, benchmarks = result.stdout.split("\n")[:3]
    assert Path(images_file).is_relative_to(unpacked_wheel / "convtune" / "data")
    assert path_entries == "1"
    assert benchmarks == "no benchmarks"


def test_bench_from_the_wheel_says_where_the_benchmarks_are(
    unpacked_wheel: Path, tmp_path: Path
) -> None:
    result = run_python(
        unpacked_wheel,
        "import sys; from convtune.training.cli import main; sys.exit(main(['bench', 'serve']))",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "source checkout" in result.stderr and "pip install -e" in result.stderr
