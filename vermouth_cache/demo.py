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

from vermouth_cache.data.bundled import bundled_file
from vermouth_cache.extract.run import ExtractReport, extract
from vermouth_cache.store.listing import table
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.store.entries import Store
from vermouth_cache.models.taps import summarize_taps
from vermouth_cache.models.tiny import write_tiny_models
from vermouth_cache.train.common import RunOptions
from vermouth_cache.train.tasks.fewshot import FewshotData, train_fewshot
from vermouth_cache.train.tasks import task_settings



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
    demo_split = bundled_file("demo", "split_zhou_Demo.json")
    base = ExtractRequest(dataset=str(demo_split), store=str(out / "store"), sd_model=str(models / "sd"),
                          captioner=str(models / "blip"), resolution=128, t=(t,), stages="mid,up",
                          attn_maps="up", expert="resnet18", expert_model=str(models / "resnet18"), device="cpu",
                          shard_size=16, batch_size=8, progress=progress)
    reports = {split: extract(base.with_(split=split)) for split in ("train", "val", "test")}
    settings = task_settings("fewshot", t=t, resolution=128, stages="mid,up", lr=3e-4, epochs=50, batch_size=8)
    opts = RunOptions(store=str(out / "store"), out=str(out / "run"), clip_model=str(models / "clip"), device="cpu",
                      progress=progress, overwrite=True)
    metrics = train_fewshot(FewshotData(str(demo_split), shots=8), settings, opts)
    return DemoResult(reports, table(Store(out / "store"), summarize_taps=summarize_taps), metrics, out / "run")
