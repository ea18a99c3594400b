"""The optimisation loop every task shares: AdamW, L2 gradient clipping, the lr schedule, periodic
validation that keeps the best weights, and a learning curve.

Deterministic on the CPU for a given seed: the model is built after `torch.manual_seed(seed)`
and the loader's order is a function of (seed, epoch).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.train.loader import CacheLoader
from vermouth_cache.core.progress import LOG_EVERY, get_logger, report_work
from vermouth_cache.train.settings import TaskSettings

log = get_logger(__name__)


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
    error: str | None = None  # why the member stopped early (a non-finite loss)


def lr_factor(s: TaskSettings, step: int, total: int, steps_per_epoch: int) -> float:
    if s.lr_schedule == "exponential":
        return s.gamma ** (step / max(1, steps_per_epoch))
    if s.lr_schedule == "polynomial":
        return (1 - min(step, total) / total) ** s.power
    return 1.0


@dataclass
class Member:
    """One head in a shared pass: its parameters, loss and settings (lr, schedule, clipping)."""
    model: torch.nn.Module
    params: list  # tensors, or groups {"params": [...], "lr_scale": x}
    loss_fn: Callable[[dict], torch.Tensor]
    settings: TaskSettings


def fit(model: torch.nn.Module, params: list, loss_fn: Callable[[dict], torch.Tensor], loader: CacheLoader,
        s: TaskSettings, *, evaluate: Callable[[], dict] | None = None, select: str | None = None) -> FitResult:
    """Train `params` of `model` on `loader`; with `evaluate`, keep the weights with the best `select`."""
    results = fit_many([Member(model, params, loss_fn, s)], loader, s,
                       evaluate=(lambda: [evaluate()]) if evaluate else None, select=select)
    if results[0].error:
        raise VermouthError(f"training diverged: {results[0].error} (try a lower --lr)")
    return results[0]


def fit_many(members: list[Member], loader: CacheLoader, s: TaskSettings, *,
             evaluate: Callable[[], list[dict]] | None = None, select: str | None = None) -> list[FitResult]:
    """Train several heads side by side on ONE pass over the features (dinov2's linear-eval grid).

    Every batch goes through every member in turn; each member has its own optimizer and lr
    schedule, so a member's result is the one it gets trained alone (same seed, same batches).
    `s` gives what they share: length, evaluation period. `evaluate` returns one dict per member.
    A member whose loss stops being finite is dropped with its error; the others go on.
    """
    steps_per_epoch = len(loader)
    total = s.iters if s.iters is not None else s.epochs * steps_per_epoch
    eval_every = s.eval_every * (steps_per_epoch if s.iters is None else 1)
    states = []
    for m in members:
        opt = torch.optim.AdamW(_groups(m.params, m.settings.lr), lr=m.settings.lr, weight_decay=m.settings.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k, ms=m.settings: lr_factor(ms, k, total, steps_per_epoch))
        states.append(_State(opt, sched))
    step, epoch = 0, 0
    desc = _desc(loader)  # a training run logs one line when done (one per epoch at debug level)
    t0 = last = time.perf_counter()
    for m in members:
        m.model.train()
    while step < total:
        loader.set_epoch(epoch)
        for batch in loader:
            step += 1
            for m, st in zip(members, states):
                if st.error is None:
                    _step(m, st, batch, step)
            live = [st for st in states if st.error is None]
            if not live:
                break
            if getattr(loader, "bar", None) is not None:
                post = {"loss": f"{live[0].history.loss[-1]:.4f}"}
                if len(members) > 1:
                    post["heads"] = len(live)
                elif live[0].best is not None and select:
                    post[select] = f"{live[0].best[select]:.4f}"
                loader.bar.set_postfix(post)
            if evaluate is not None and (step % eval_every == 0 or step == total):
                for m in members:
                    m.model.eval()
                metrics = evaluate()
                for m, st, mt in zip(members, states, metrics):
                    m.model.train()
                    if st.error is None:
                        st.record(mt, step, select, m.model)
            report_work(step, total)  # a sweep's bar moves with its points' steps
            if step >= total:
                break
        if not any(st.error is None for st in states):
            break
        epoch += 1
        if desc and time.perf_counter() - last >= LOG_EVERY and step < total:
            last = time.perf_counter()
            log.info(f"{desc}: epoch {epoch}, step {step}/{total}{_status(members, states, select)}, "
                     f"{last - t0:.0f} s")
    if desc:
        log.info(f"{desc}: {epoch} epoch(s), {step}/{total} steps"
                 f"{_status(members, states, select)}, {time.perf_counter() - t0:.1f} s")
    out = []
    for m, st in zip(members, states):
        if st.best_state is not None:
            m.model.load_state_dict(st.best_state)
        if st.error is None and not all(torch.isfinite(p).all() for p in m.model.state_dict().values()
                                        if p.is_floating_point()):
            st.error = f"non-finite weights after step {st.steps}"  # an update that overflowed, loss still finite
        m.model.eval()
        out.append(FitResult(st.history, st.steps, st.best_step, st.best, st.error))
    return out


def _desc(loader) -> str | None:
    """The name the loader's progress goes by (a paired loader's first half), None when quiet."""
    return getattr(loader, "progress", None) or getattr(getattr(loader, "a", None), "progress", None)


def _status(members: list[Member], states: list["_State"], select: str | None) -> str:
    live = [st for st in states if st.error is None]
    if not live:
        return f", every head failed ({states[0].error})"
    text = f", loss {live[0].history.loss[-1]:.4f}" if live[0].history.loss else ""
    if len(members) > 1:
        return text + f", {len(live)} of {len(members)} heads"
    if live[0].best is not None and select:
        text += f", best val {select} {live[0].best[select]:.4f} at step {live[0].best_step}"
    return text


@dataclass
class _State:
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    history: History = field(default_factory=History)
    steps: int = 0
    best: dict | None = None
    best_step: int | None = None
    best_state: dict | None = None
    error: str | None = None

    def record(self, metrics: dict, step: int, select: str | None, model: torch.nn.Module) -> None:
        self.history.eval_steps.append(step)
        self.history.evals.append(metrics)
        if self.best is None or metrics[select] > self.best[select]:
            self.best, self.best_step = metrics, step
            self.best_state = copy.deepcopy(model.state_dict())


def _groups(params: list, lr: float) -> list:
    """AdamW's parameter groups: a plain list is one group; {"params", "lr_scale"} dicts (a U-net at
    a task's multiplier) get lr * lr_scale. Groups without parameters are dropped."""
    if not params or not isinstance(params[0], dict):
        return [{"params": list(params)}]
    return [{"params": g["params"], "lr": lr * g.get("lr_scale", 1.0)} for g in params if g["params"]]


def _tensors(params: list) -> list:
    return [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else list(params)


def _step(m: Member, st: _State, batch: dict, step: int) -> None:
    loss = m.loss_fn(batch)
    if not math.isfinite(loss.item()):
        st.error = f"loss became {loss.item()} at step {step - 1}"
        return
    st.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(_tensors(m.params), m.settings.grad_clip)
    st.opt.step()
    st.sched.step()
    st.steps = step
    st.history.loss_steps.append(step)
    st.history.loss.append(round(loss.item(), 6))
