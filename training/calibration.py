"""Calibration: do the reported probabilities mean what they say?

A network trained with cross-entropy is usually over-confident: among the images it calls
90 % sure, fewer than 90 % are right. Temperature scaling (Guo et al., 2017) divides the
logits by one scalar T > 1 fitted on the validation split to minimise the negative log
likelihood; the predicted class never changes, only how sure the softmax is. The expected
calibration error (ECE) measures the gap: bin the predictions by confidence into 15 equal
bins, and average |accuracy - mean confidence| over the bins weighted by their size.

With test-time views (``models.inference.VIEW_SETS``) the served probability is the mean
over the views of ``softmax(logits_v / T)``; averaging already softens it, so each view set
gets its own T, fitted for that mean (whose top class may change with T). Every function
here that takes logits takes one view's ``(N, C)`` or V views' ``(V, N, C)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from convtune.models.inference import image_views, view_probabilities

ECE_BINS = 15


def collect_logits(model: torch.nn.Module, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` over ``loader`` in eval mode; return (logits, labels) as numpy."""
    logits, labels = collect_view_logits(model, loader, views="none")
    return logits[0], labels


@torch.no_grad()
def collect_view_logits(
    model: torch.nn.Module, loader: DataLoader, *, views: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(V, N, C)`` logits of ``model`` in eval mode on each of the ``views`` of
    ``loader``'s images (the views the served model averages), and the labels."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for pixels, target in loader:
        # One forward pass per view keeps memory at one batch's; the views come from the
        # same function that makes them for onnxruntime, so the order and the maps agree.
        copies = image_views(pixels.numpy(), views)
        batch = [model(torch.from_numpy(np.ascontiguousarray(c))).float() for c in copies]
        logits.append(torch.stack(batch).numpy())
        labels.append(np.asarray(target))
    model.train(was_training)
    return np.concatenate(logits, axis=1), np.concatenate(labels)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, max_iter: int = 100) -> float:
    """The temperature minimising NLL of the mean over views of ``softmax(logits_v / T)``
    (of ``softmax(logits / T)`` for one view's logits); LBFGS on log T."""
    logits_t = torch.as_tensor(logits, dtype=torch.float64)
    logits_t = logits_t.reshape(-1, *logits_t.shape[-2:])
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    log_views = float(np.log(len(logits_t)))
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        log_p = torch.log_softmax(logits_t / log_t.exp(), dim=-1)  # (V, N, C)
        picked = log_p[:, torch.arange(len(labels_t)), labels_t]  # (V, N)
        # log of the mean over views of p, computed from the log-probabilities stably
        loss = -(torch.logsumexp(picked, dim=0) - log_views).mean()
        loss.backward()
        return loss

    optimiser.step(closure)
    return float(log_t.exp().clamp(0.05, 100.0).item())


def fit_temperatures(logits: np.ndarray, labels: np.ndarray, *, views: str) -> dict[str, float]:
    """Temperatures for the single view and, unless it is ``none``, for the ``views`` set,
    from that set's ``(V, N, C)`` logits (the single view is the first)."""
    temperatures = {"none": fit_temperature(logits[0], labels)}
    if views != "none":
        temperatures[views] = fit_temperature(logits, labels)
    return temperatures


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
    before, after = view_probabilities(logits, 1.0), view_probabilities(logits, temperature)
    return {
        "temperature": temperature,
        "ece": expected_calibration_error(after, labels),
        "nll": negative_log_likelihood(after, labels),
        "uncalibrated": {
            "ece": expected_calibration_error(before, labels),
            "nll": negative_log_likelihood(before, labels),
        },
    }
