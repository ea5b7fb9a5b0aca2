"""Calibration: do the reported probabilities mean what they say?

A network trained with cross-entropy is usually over-confident: among the images it calls
90 % sure, fewer than 90 % are right. Temperature scaling (Guo et al., 2017) divides the
logits by one scalar T > 1 fitted on the validation split to minimise the negative log
likelihood; the predicted class never changes, only how sure the softmax is. The expected
calibration error (ECE) measures the gap: bin the predictions by confidence into 15 equal
bins, and average |accuracy - mean confidence| over the bins weighted by their size.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from models.inference import softmax

ECE_BINS = 15


@torch.no_grad()
def collect_logits(model: torch.nn.Module, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` over ``loader`` in eval mode; return (logits, labels) as numpy."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for pixels, target in loader:
        logits.append(model(pixels).float().numpy())
        labels.append(np.asarray(target))
    model.train(was_training)
    return np.concatenate(logits), np.concatenate(labels)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, max_iter: int = 100) -> float:
    """The temperature minimising NLL of ``softmax(logits / T)`` (LBFGS on log T)."""
    logits_t = torch.as_tensor(logits, dtype=torch.float64)
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits_t / log_t.exp(), labels_t)
        loss.backward()
        return loss

    optimiser.step(closure)
    return float(log_t.exp().clamp(0.05, 100.0).item())


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def reliability_bins(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """Per confidence bin: its range, count, accuracy and mean confidence."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Right-closed bins (lo, hi], with 0 confidence in the first: the usual convention.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    table = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        table.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": count,
                "accuracy": float(correct[members].mean()) if count else 0.0,
                "confidence": float(confidence[members].mean()) if count else 0.0,
            }
        )
    return table


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    table = reliability_bins(probabilities, labels, bins)
    total = sum(row["count"] for row in table)
    return float(
        sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in table) / total
    )


def calibration_summary(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """ECE and NLL before (T = 1) and after temperature scaling."""
    before, after = softmax(logits), softmax(logits, temperature)
    return {
        "temperature": temperature,
        "ece": expected_calibration_error(after, labels),
        "nll": negative_log_likelihood(after, labels),
        "uncalibrated": {
            "ece": expected_calibration_error(before, labels),
            "nll": negative_log_likelihood(before, labels),
        },
    }
