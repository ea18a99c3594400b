"""A linear probe on pooled cached features: the simple few-shot head the demo trains.

Global-average-pools each tap (C, H, W) -> (C,), concatenates the taps, standardises with the
training statistics and fits a softmax classifier with full-batch L-BFGS. Deterministic on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch

from .store import OK, Entry


def pooled_features(entry: Entry, taps: list[str]) -> tuple[np.ndarray, list[int]]:
    """(N_ok, sum C) pooled features and the sample indices they belong to (failed ones dropped)."""
    statuses = [entry.statuses(t) for t in taps]
    keep = [i for i in range(entry.n_samples) if all(st[i] == OK for st in statuses)]
    parts = [entry.read(t, keep).astype(np.float32).mean(axis=(2, 3)) for t in taps]
    return np.concatenate(parts, axis=1), keep


def fit_linear_probe(x: np.ndarray, y: np.ndarray, n_classes: int, *, weight_decay: float = 1e-2,
                     steps: int = 100, seed: int = 0):
    """Returns a predict(x) -> labels function."""
    torch.manual_seed(seed)
    xt = torch.from_numpy(x).double()
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-6)
    xt = (xt - mean) / std
    yt = torch.from_numpy(np.asarray(y)).long()
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)

    def predict(x_new: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = (torch.from_numpy(x_new).double() - mean) / std
            return (z @ w + b).argmax(1).numpy()

    return predict


def top1(pred: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(pred) == np.asarray(y)).mean()) if len(y) else float("nan")
