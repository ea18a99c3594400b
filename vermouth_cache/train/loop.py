"""The optimisation loop every task shares: AdamW, L2 gradient clipping, the lr schedule, periodic
validation that keeps the best weights, and a learning curve.

Deterministic on the CPU for a given seed: the model is built after `torch.manual_seed(seed)`
and the loader's order is a function of (seed, epoch).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..loader import CacheLoader
from .settings import TaskSettings


@dataclass
class History:
    loss_steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"loss_steps": self.loss_steps, "loss": self.loss, "eval_steps": self.eval_steps, "evals": self.evals}


@dataclass
class FitResult:
    history: History
    steps: int
    best_step: int | None
    best: dict | None  # the validation metrics of the kept weights


def lr_factor(s: TaskSettings, step: int, total: int, steps_per_epoch: int) -> float:
    if s.lr_schedule == "exponential":
        return s.gamma ** (step / max(1, steps_per_epoch))
    if s.lr_schedule == "polynomial":
        return (1 - min(step, total) / total) ** s.power
    return 1.0


def fit(model: torch.nn.Module, params: list, loss_fn: Callable[[dict], torch.Tensor], loader: CacheLoader,
        s: TaskSettings, *, evaluate: Callable[[], dict] | None = None, select: str | None = None) -> FitResult:
    """Train `params` of `model` on `loader`; with `evaluate`, keep the weights with the best `select`."""
    steps_per_epoch = len(loader)
    total = s.iters if s.iters is not None else s.epochs * steps_per_epoch
    eval_every = s.eval_every * (steps_per_epoch if s.iters is None else 1)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(s, k, total, steps_per_epoch))
    hist = History()
    best, best_step, best_state = None, None, None
    step, epoch = 0, 0
    model.train()
    while step < total:
        loader.set_epoch(epoch)
        for batch in loader:
            loss = loss_fn(batch)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            opt.step()
            sched.step()
            step += 1
            hist.loss_steps.append(step)
            hist.loss.append(round(loss.item(), 6))
            if getattr(loader, "bar", None) is not None:
                post = {"loss": f"{loss.item():.4f}"}
                if best is not None and select:
                    post[select] = f"{best[select]:.4f}"
                loader.bar.set_postfix(post)
            if evaluate is not None and (step % eval_every == 0 or step == total):
                model.eval()
                metrics = evaluate()
                model.train()
                hist.eval_steps.append(step)
                hist.evals.append(metrics)
                if best is None or metrics[select] > best[select]:
                    best, best_step = metrics, step
                    best_state = copy.deepcopy(model.state_dict())
            if step >= total:
                break
        epoch += 1
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(hist, step, best_step, best)
