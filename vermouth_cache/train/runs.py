"""A run directory is the record of one training run:

    RUN/config.json        resolved settings, datasets, head architecture, class names
    RUN/metrics.json       the task's metrics, per-class figures, the recipe key of every cache entry read
    RUN/head.safetensors   the head's weights (+ the U-net norm layers with --tune-norms)
    RUN/curve.png          training loss and validation metric against the step

Every file is written through a temporary name and renamed into place; an existing run is never
overwritten unless asked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from vermouth_cache.core.atomic import atomic_write, atomic_write_json
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.errors import available, install_hint
from vermouth_cache.core.progress import get_logger
from vermouth_cache.core.atomic import output_directory
from vermouth_cache.store.entries import refuse_inside_store
from vermouth_cache.train.vpd_heads import VpdHeadSpec, is_vpd_spec
from vermouth_cache.train.heads import HeadSpec, VermouthHead
from vermouth_cache.store.files import read_json
from vermouth_cache.train.loop import FitResult, History

log = get_logger(__name__)
FILES = ("config.json", "metrics.json", "head.safetensors", "curve.png")


def check_run_dir(out: str | os.PathLike) -> Path:
    """`out` as a Path, refused if it (or a parent) exists and is not a directory."""
    refuse_inside_store(out, "run directory")
    return output_directory(out, "run directory")


def prepare_run_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Check, before training, that the run can be written; the folder itself is made only when the
    run is (`make_run_dir`), so a run that fails leaves nothing behind."""
    out = check_run_dir(out)
    if (out / "config.json").exists() and not overwrite:
        raise VermouthError(f"run directory {out} already holds a run (give --overwrite to replace it)")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise VermouthError(f"cannot create run directory {out}: {existing} is not writable")
    return out


def make_run_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VermouthError(f"cannot create run directory {out}: {e.strerror or e}") from None
    return out


def write_run(out: Path, *, config: dict, metrics: dict, model: VermouthHead, history: History,
              select: str | None, extra_weights: dict[str, torch.Tensor] | None = None) -> None:
    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extra_weights or {}).items()})
    meta = {"head_spec": json.dumps(model.spec.to_json()), "out_dim": str(config["out_dim"])}
    # bytes, not save_file: safetensors writes a file of its own with mode 0600 and renames it
    atomic_write(out / "head.safetensors", save(tensors, metadata=meta))
    atomic_write_json(out / "config.json", config)
    atomic_write_json(out / "metrics.json", {**metrics, "history": history.to_json()})
    if available("matplotlib"):
        atomic_write(out / "curve.png", write=lambda p: plot_curve(history, select, p, title=config.get("title", "")))
    else:  # the curve is a by-product: the run stands without it
        (out / "curve.png").unlink(missing_ok=True)
        log.warning("%s: no curve.png, drawing it needs matplotlib: %s", out, install_hint("matplotlib"))


def finish_run(out: Path, config: dict, metrics: dict, model: VermouthHead, result: FitResult, *,
               select: str | None, extra_weights: dict[str, torch.Tensor] | None = None) -> dict:
    """Write a finished head's run; a head whose loss diverged gets its error written instead
    (config.json and metrics.json with "error", no weights) and returned."""
    make_run_dir(out)
    if result.error:
        for name in ("head.safetensors", "curve.png"):
            (out / name).unlink(missing_ok=True)
        failed = {"task": metrics["task"], "error": result.error, "steps": result.steps,
                  "history": result.history.to_json()}
        atomic_write_json(out / "config.json", config)
        atomic_write_json(out / "metrics.json", failed)
        return failed
    write_run(out, config=config, metrics=metrics, model=model, history=result.history, select=select,
              extra_weights=extra_weights)
    return metrics


def raise_failed(metrics: dict) -> dict:
    """A single run's metrics, or its divergence as an error."""
    if "error" in metrics:
        raise VermouthError(f"training diverged: {metrics['error']} (try a lower --lr)")
    return metrics


def load_head(run: str | os.PathLike) -> tuple[VermouthHead, dict, dict[str, torch.Tensor]]:
    """The trained head of a run directory, its config, and any extra weights (tuned norms)."""
    run = Path(run)
    path = run / "head.safetensors"
    if not path.is_file():
        raise VermouthError(f"{run} is not a run directory (no head.safetensors)")
    from safetensors import safe_open

    try:  # a damaged head is one line naming the file, whatever the library raises
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        spec = json.loads(meta["head_spec"])
        if is_vpd_spec(spec):
            model = VpdHeadSpec(**spec).build()
        else:
            model = VermouthHead(HeadSpec.from_json(spec), int(meta["out_dim"]))
        model.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    except VermouthError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise VermouthError(f"{path} is not a head this version can load ({type(exc).__name__}: "
                            f"{str(exc)[:120]})") from None
    model.eval()
    extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
    return model, read_json(run / "config.json"), extra


def plot_curve(history: History, select: str | None, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(history.loss_steps, history.loss, lw=0.8, color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    if select and history.evals:
        ax2 = ax.twinx()
        ax2.plot(history.eval_steps, [e[select] for e in history.evals], "o-", color="tab:red", label=select)
        ax2.set_ylabel(f"validation {select}", color="tab:red")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
