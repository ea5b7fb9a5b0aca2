"""Calibration: do the reported probabilities mean what they say?

A network trained with cross-entropy is usually over-confident: among the images it calls
90 % sure, fewer than 90 % are right. Temperature scaling (Guo et al., 2017) divides the
logits by one scalar T > 1 fitted on the validation split to minimise the negative log
likelihood; the predicted class never changes, only how sure the softmax is. The expected
calibration error (``training.metrics``) measures the gap.

With test-time views (``models.inference.VIEW_SETS``) the served probability is the mean
over the views of ``softmax(logits_v / T)``; averaging already softens it, so each view set
gets its own T, fitted for that mean (whose top class may change with T). Every function
here that takes logits takes one view's ``(N, C)`` or V views' ``(V, N, C)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from convtune.models.inference import image_views


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
