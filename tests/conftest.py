"""Shared fixtures: tiny models written once per session, small image sets, isolated caches."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a hub in tests
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
DEMO_SPLIT = REPO / "data" / "demo" / "split_zhou_Demo.json"


@pytest.fixture(autouse=True)
def _isolated_cache_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VERMOUTH_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache-home"))


@pytest.fixture(autouse=True)
def _unconfigured_logging():
    """A CLI call configures the package logger (level, a stderr handler); the next test starts
    as the Python API does, with it unconfigured."""
    yield
    import logging

    log = logging.getLogger("vermouth_cache")
    for h in list(log.handlers):
        log.removeHandler(h)
    log.setLevel(logging.NOTSET)
    log.propagate = True


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from vermouth_cache.models.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("models"), seed=0)


def make_images(root: Path, classes: dict[str, int], *, size=(96, 80), seed: int = 0) -> Path:
    """root/<class>/<i>.png with distinct random content; non-square so resize and crop matter."""
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    """A 2-class image folder of 5 images, each 96x80."""
    return make_images(tmp_path / "imgs", {"cat": 3, "dog": 2})


@pytest.fixture
def request_for(tiny, tmp_path):
    """ExtractRequest factory on the tiny models, CPU, quiet, small shards."""
    from vermouth_cache.extract.request import ExtractRequest

    def make(dataset, **kw):
        base = dict(dataset=str(dataset), store=str(tmp_path / "store"), sd_model=str(tiny["sd"]),
                    captioner=str(tiny["blip"]), resolution=128, device="cpu", shard_size=2, batch_size=2,
                    progress=False)
        base.update(kw)
        return ExtractRequest(**base)

    return make


def is_debris(p: Path) -> bool:
    """A temporary file a killed writer left (never read; `repair` removes it)."""
    return p.name.startswith(".") or p.name.endswith(".partial")


def store_bytes(root: Path) -> dict[str, bytes]:
    """Every data chunk and Zarr metadata file of a store, by relative path (records separately)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "/arrays/" in str(p) and not is_debris(p)}


def record_content(root: Path) -> dict[str, tuple]:
    """Shard records without the run facts (device, seconds) that may differ between runs."""
    import json

    out = {}
    for p in sorted(root.rglob("shards/*/*.json")):
        rec = json.loads(p.read_text())
        out[str(p.relative_to(root))] = (rec["start"], rec["stop"], tuple(rec["status"]), tuple(rec.get("values") or ()),
                                         tuple(sorted((rec.get("chunk") or {}).items())))
    return out


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """The real entry point (`vermouth-cache ...`), in process: exit code, stdout, stderr."""
    from vermouth_cache.cli.main import run

    monkeypatch.setattr(sys, "argv", ["vermouth-cache", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        run()
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


# ---- sweep point records, for report tests (tests/sweep) and the umask test (tests/store) ----

BASE = {"t": 200, "stages": "up", "prompt": "blip", "noise": "ddpm", "attn_maps": "up", "expert": None,
        "text_proj": False, "head": "uhead", "lr": 1e-05}


def point(name, dataset, varied, scores, *, task="fewshot", paper=(), status="done", **settings):
    return {
        "point": name, "dataset": dataset, "task": task, "varied": varied,
        "settings": {**BASE, **varied, **settings}, "status": status,
        "scores": [{"dataset": d, "metric": m, "value": v} for d, m, v in scores],
        "paper": [{"dataset": d, "metric": m, "value": v} for d, m, v in paper],
        "entries": {"features": f"feat{name}" * 3, "expert": ""}, "seconds": 12.5, "heads_in_pass": 2,
        "run": f"runs/{name}",
    }


def grid():
    """A 2x2 cartesian grid over t and stages on two datasets."""
    out = []
    for ds, base in (("imagenet", 0.40), ("cub", 0.60)):
        for t in (200, 100):  # deliberately not in numeric order
            for stages in ("up", "down"):
                value = base + t / 10000 + (0.01 if stages == "down" else 0.0)
                out.append(point(f"{ds}-t_{t}-stages_{stages}", ds, {"t": t, "stages": stages},
                                 [(ds, "top1", value)]))
    return out
