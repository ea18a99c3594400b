"""`demo`: the whole flow on tiny models and the bundled demo data, in seconds on 2 CPUs.

    vermouth-cache demo --out demo-out

Writes tiny random models, extracts the demo split's train, val and test images into a store (all
mid+up, up-block attention maps, the ResNet-18 expert), lists the store, then trains the few-shot
U-head from the cache (`train fewshot`: val picks the epoch, top-1 on test) into demo-out/run.
The models are RANDOM: the figure checks the flow, not the method. t is 10 because at t=200 the
noise swamps what random weights keep of an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .extract import ExtractReport, extract
from .listing import table
from .request import ExtractRequest
from .store import Store
from .tiny_models import write_tiny_models
from .train.common import RunOptions
from .train.fewshot import FewshotData, train_fewshot
from .train.settings import task_settings

DEMO_SPLIT = Path(__file__).resolve().parent.parent / "data" / "demo" / "split_zhou_Demo.json"


@dataclass
class DemoResult:
    reports: dict[str, ExtractReport]
    listing: str
    metrics: dict
    run: Path

    @property
    def accuracy(self) -> float:
        return self.metrics["top1"]


def run_demo(out: str | Path, *, progress: bool = True, t: int = 10) -> DemoResult:
    out = Path(out)
    models = out / "models"
    if not (models / "sd" / "model_index.json").is_file():
        write_tiny_models(models)
    base = ExtractRequest(dataset=str(DEMO_SPLIT), store=str(out / "store"), sd_model=str(models / "sd"),
                          captioner=str(models / "blip"), resolution=128, t=(t,), stages="mid,up",
                          attn_maps="up", expert="resnet18", expert_model=str(models / "resnet18"), device="cpu",
                          shard_size=16, batch_size=8, progress=progress)
    reports = {split: extract(base.with_(split=split)) for split in ("train", "val", "test")}
    settings = task_settings("fewshot", t=t, resolution=128, stages="mid,up", lr=3e-4, epochs=50, batch_size=8)
    opts = RunOptions(store=str(out / "store"), out=str(out / "run"), clip_model=str(models / "clip"), device="cpu",
                      progress=progress, overwrite=True)
    metrics = train_fewshot(FewshotData(str(DEMO_SPLIT), shots=8), settings, opts)
    return DemoResult(reports, table(Store(out / "store")), metrics, out / "run")
