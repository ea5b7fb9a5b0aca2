"""Shared fixtures: a generated shapes dataset and one trained + exported run.

Training happens once per test session (about 15 s on 2 cores) and every test that needs
a real model reuses it. Under CI (``CI`` set, as ``.ci/run`` runs) a skipped test fails
instead: a skip there means a part the suite needs (a browser, Docker, the weights extra,
two cores) is missing, and a green run must not hide that.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import pytest

import convtune  # noqa: F401  (sets the quiet environment that servers started by tests inherit)

# Set before anything imports bentoml, which reads it once; servers started by tests
# inherit it. The suite never touches the user's own model store.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="convtune-test-bentoml-")

from convtune.data.synthetic import make_shapes_dataset

IMAGE_SIZE = 40
# A recipe that reliably learns the shapes task in 2 epochs from scratch (val ≈ 0.9+).
FIT_ARGS = [
    "--model", "test_resnet", "--pretrained", "none", "--epochs", "2",
    "--img-size", str(IMAGE_SIZE), "--batch-size", "16", "--freeze-epochs", "0",
    "--optimizer", "sgd", "--lr", "0.1", "--aug-scale-min", "0.9", "--num-workers", "0",
    "--test-fraction", "0.2", "--binary-negative", "circle",
    "--tta", "d4",  # a temperature for the 8 views too, and their column in the report
]  # fmt: skip


def running_in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in {"", "0", "false", "no"}


def failed_if_skipped_in_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped and running_in_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where every test must run: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    failed_if_skipped_in_ci(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport:
    """A module skipped whole (``pytest.importorskip`` at its top) is skipped here."""
    report = yield
    failed_if_skipped_in_ci(report)
    return report


# A test that uses one of these trains the session's model or starts a server: it is
# marked slow here, whatever its module says, so that ``-m "not slow"`` starts neither.
SLOW_FIXTURES = frozenset({"trained_run", "served", "start_server", "start_refused"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def fit_args() -> list[str]:
    return list(FIT_ARGS)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), per_class=200, size=IMAGE_SIZE, seed=0
    )


@pytest.fixture(scope="session")
def heldout_shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images the model never saw, drawn with another seed."""
    return make_shapes_dataset(
        tmp_path_factory.mktemp("heldout"), per_class=15, size=IMAGE_SIZE, seed=123
    )


@pytest.fixture(scope="session")
def bentoml_home() -> Path:
    return Path(os.environ["BENTOML_HOME"])


@pytest.fixture(scope="session")
def trained_run(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from convtune.training.cli import main

    run_dir = tmp_path_factory.mktemp("runs") / "shapes"
    assert main(["fit", "--data", str(shapes_dir), "--out", str(run_dir), *FIT_ARGS]) == 0
    return run_dir


@pytest.fixture(scope="session")
def exported_model(trained_run: Path, bentoml_home: Path) -> str:
    """``convtune export`` of the trained run as ``convtune`` into the session's BentoML
    store: the tag it prints."""
    from convtune.training.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(trained_run), "--name", "convtune"]) == 0
    return printed.getvalue().strip()


@pytest.fixture(scope="session")
def artifact_dir(trained_run: Path, exported_model: str) -> Path:
    return trained_run / "artifact"
