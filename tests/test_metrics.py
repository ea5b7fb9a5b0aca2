"""The metrics: worked examples, a class absent from the images, and validation's
torchmetrics held to the same definitions."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from convtune.models.factory import create_model
from convtune.models.inference import softmax
from convtune.training.config import FitConfig
from convtune.training.metrics import (
    ECE_BINS,
    classification_metrics,
    expected_calibration_error,
    negative_log_likelihood,
)
from convtune.training.module import ClassifierModule, Recipe


def test_metrics_against_a_hand_worked_example() -> None:
    # 3 cats, 2 dogs, 1 fox; predictions: cat cat dog | dog cat | fox.
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 0, 2])
    metrics = classification_metrics(labels, predicted, ("cat", "dog", "fox"))
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    cat = metrics["per_class"]["cat"]
    assert (cat["precision"], cat["recall"]) == pytest.approx((2 / 3, 2 / 3))
    dog = metrics["per_class"]["dog"]
    assert (dog["precision"], dog["recall"], dog["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)


def test_a_class_absent_from_the_images_counts_only_when_predicted() -> None:
    labels = np.array([0, 0, 1, 1])  # no fox among the images
    perfect = classification_metrics(labels, labels, ("cat", "dog", "fox"))
    assert perfect["macro_f1"] == 1.0
    assert perfect["per_class"]["fox"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                           "support": 0}  # fmt: skip
    # A fox predicted: its F1 is 0 and counts; the cat's is 2/3 (1 of 2 found, no mistake).
    wrong = classification_metrics(labels, np.array([0, 2, 1, 1]), ("cat", "dog", "fox"))
    assert wrong["macro_f1"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)


def random_predictions(absent: str, *, n: int = 300, k: int = 4) -> tuple[np.ndarray, ...]:
    """Logits with some signal and their labels; the last class is, per ``absent``: among
    the labels (``none``), absent and never predicted, or absent and sometimes predicted."""
    rng = np.random.default_rng(len(absent))
    labels = rng.integers(0, k if absent == "none" else k - 1, n)
    logits = rng.normal(0.0, 1.0, (n, k))
    logits[np.arange(n), labels] += 1.0
    if absent == "never predicted":
        logits[:, k - 1] = -50.0
    if absent == "predicted":
        logits[:7, k - 1] = 50.0
    return logits.astype(np.float32), labels


@pytest.mark.parametrize("absent", ["none", "never predicted", "predicted"])
def test_validation_metrics_agree_with_the_reported_ones(absent: str) -> None:
    logits, labels = random_predictions(absent)
    predicted = logits.argmax(axis=1)
    assert (3 in labels) == (absent == "none")
    assert (3 in predicted) == (absent != "never predicted")
    # The module's own metrics, fed batch by batch as validation feeds them.
    recipe = Recipe(**FitConfig(data="d", model="m", out="o").recipe_kwargs())
    module = ClassifierModule(create_model("test_resnet", 4, pretrained="none"), recipe)
    for batch in np.array_split(np.arange(len(labels)), 7):
        scores, targets = torch.from_numpy(logits[batch]), torch.from_numpy(labels[batch])
        module.val_accuracy.update(scores, targets)
        module.val_macro_f1.update(scores, targets)
    reported = classification_metrics(labels, predicted, ("a", "b", "c", "d"))
    assert module.val_accuracy.compute().item() == pytest.approx(reported["accuracy"], abs=1e-6)
    assert module.val_macro_f1.compute().item() == pytest.approx(reported["macro_f1"], abs=1e-6)
    if absent == "never predicted":  # the case where counting the class as F1 0 differs
        every_class = np.mean([c["f1"] for c in reported["per_class"].values()])
        assert reported["macro_f1"] > every_class + 0.1


def test_ece_and_nll_agree_with_torch() -> None:
    logits, labels = random_predictions("none", n=2000)
    probabilities = softmax(logits)
    ece = MulticlassCalibrationError(num_classes=4, n_bins=ECE_BINS, norm="l1")
    expected = ece(torch.from_numpy(probabilities).float(), torch.from_numpy(labels)).item()
    assert expected_calibration_error(probabilities, labels) == pytest.approx(expected, abs=1e-5)
    nll = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
    assert negative_log_likelihood(probabilities, labels) == pytest.approx(nll.item(), rel=1e-5)


def test_the_metrics_need_no_torch() -> None:
    script = (
        "import sys\n"
        "class Blocker:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Blocker())\n"
        "import numpy as np\n"
        "from convtune.training.metrics import classification_metrics\n"
        "print(classification_metrics(np.array([0, 1]), np.array([0, 0]), ('a', 'b'))"
        "['accuracy'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0.5"
