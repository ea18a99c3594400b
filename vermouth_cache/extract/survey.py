"""What `extract` would find and compute for a request, without writing a byte or running a model:
the dry run of `vermouth-cache sweep`.

    for e in survey(ExtractRequest(dataset=..., store=..., t=(100, 200))):
        print(e.kind, e.key, e.state, e.bytes_to_write)

Entry keys come from the same `make_plan` that `extract` runs (model identities are file hashes, so
no weight is loaded); sizes come from shapes: text and latent shapes from the model configs,
tap and expert shapes from one forward pass of the models built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.extract.compute import expert_maps
from vermouth_cache.extract.plan import CAPTIONS, EXPERT_LEVELS, LATENTS, TEXT, dataset_record, make_plan, missing
from vermouth_cache.core.hashing import recipe_key
from vermouth_cache.models.loading import Captioner, Expert, Placement
from vermouth_cache.models.pipeline import StableDiffusion
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.methods import method_named
from vermouth_cache.methods.conditioning import conditioning_of
from vermouth_cache.store.arrays import STORAGE_DTYPES
from vermouth_cache.store.codecs import codec_named
from vermouth_cache.store.entries import Store
from vermouth_cache.store.entry import Entry
from vermouth_cache.models.taps import run_taps


@dataclass
class EntryPlan:
    kind: str
    key: str
    about: dict
    n_samples: int
    samples_to_compute: dict[str, int]  # array -> samples whose shard is missing
    bytes_to_write: int  # estimate: missing samples x bytes per sample, uncompressed

    @property
    def state(self) -> str:
        todo = sum(self.samples_to_compute.values())
        if not todo:
            return "present"
        return "missing" if todo == self.n_samples * len(self.samples_to_compute) else "partial"


class _Absent:
    """An entry the store does not hold yet: nothing done."""

    def __init__(self, kind: str, key: str, n_samples: int, shard_size: int):
        self.kind, self.key, self.n_samples, self.shard_size = kind, key, n_samples, shard_size
        self.prefix = f"{kind}/{key}"
        self.n_shards = -(-n_samples // shard_size)

    def done_shards(self, name: str) -> set[int]:
        return set()


def survey(req: ExtractRequest) -> list[EntryPlan]:
    """Every entry `extract(req)` would touch, its state and the bytes it would still write."""
    ds = req.load_dataset()
    cpu = Placement(torch.device("cpu"), torch.float32)
    sd = StableDiffusion(req.sd_model, cpu)
    captioner = Captioner(req.captioner, cpu) if conditioning_of(req.prompt).needs_captioner else None
    expert = Expert(req.expert, req.expert_model, cpu) if req.expert else None
    try:
        store = Store(req.store, read_only=True)
    except VermouthError:
        store = None  # no store yet: every entry is missing
    abouts: dict[str, dict] = {}

    def lookup(kind, recipe, *, n_samples, shard_size, about):
        key = recipe_key(recipe)
        abouts[key] = about
        if store is not None and store.loc.exists(f"{kind}/{key}/manifest.json"):
            return Entry(store.loc, kind, key)
        return _Absent(kind, key, n_samples, shard_size)

    def stored_shard_size(kind, key):
        if store is None or not store.loc.exists(f"{kind}/{key}/manifest.json"):
            return None
        return Entry(store.loc, kind, key).shard_size

    plan = make_plan(req, ds, lookup, sd, captioner, expert, recipe_key(dataset_record(ds)),
                 shard_size_of=stored_shard_size)
    todo = missing(plan)
    bounds = {s: min(len(ds), (s + 1) * plan.captions.shard_size) - s * plan.captions.shard_size
              for s in range(plan.captions.n_shards)}
    sizes = sample_bytes(req, sd, expert, plan.taps)

    def count(pred) -> int:
        return sum(bounds[s] for s, need in todo.items() if pred(need))

    out = [EntryPlan("captions", plan.captions.key, abouts[plan.captions.key], len(ds),
                     {CAPTIONS: count(lambda n: n["captions"])}, 0)]
    for kind, entry, name in (("text", plan.text, TEXT), ("latents", plan.latents, LATENTS)):
        n = count(lambda need, k=kind: need[k])
        out.append(EntryPlan(kind, entry.key, abouts[entry.key], len(ds), {name: n}, n * sizes[name]))
    for t, entry in plan.features.items():
        per = {tp: count(lambda need, t=t, tp=tp: tp in need["features"].get(t, ())) for tp in plan.taps}
        out.append(EntryPlan("features", entry.key, abouts[entry.key], len(ds), per,
                             sum(n * sizes[tp] for tp, n in per.items())))
    if plan.expert is not None:
        n = count(lambda need: need["expert"])
        out.append(EntryPlan("expert", plan.expert.key, abouts[plan.expert.key], len(ds),
                             {name: n for name in EXPERT_LEVELS}, n * sum(sizes[x] for x in EXPERT_LEVELS)))
    return out


def sample_bytes(req: ExtractRequest, sd: StableDiffusion, expert: Expert | None, taps) -> dict[str, int]:
    """Bytes per sample of every array the request writes."""
    item = np.dtype(STORAGE_DTYPES[req.dtype] if req.dtype != "bf16" else "float16").itemsize
    vae = sd.config("vae")
    f = 2 ** (len(vae["block_out_channels"]) - 1)
    side = req.resolution // f
    unet = sd.unet_skeleton
    tokens = conditioning_of(req.prompt).tokens(req, sd)  # 77 for captions, the table's rows, 1 for its class row
    out = {TEXT: tokens * sd.condition_width * 4, LATENTS: vae["latent_channels"] * side * side * 4}
    lat = torch.empty(1, vae["latent_channels"], side, side, device="meta")
    cond = torch.empty(1, tokens, sd.condition_width, device="meta")
    shapes = run_taps(unet, lat, req.t[0], cond, taps, attention=method_named(req.method).attention)
    out.update({tp: _stored(tuple(v.shape[1:]), item, req.codec) for tp, v in shapes.items()})
    if expert is not None:
        x = torch.empty(1, 3, req.resolution, req.resolution, device="meta")
        for i, m in enumerate(expert_maps(expert.name, expert.skeleton, x)):
            out[f"expert.level{i}"] = _stored(tuple(m.shape[1:]), item, req.codec)
    return out


def _stored(shape: tuple[int, ...], item: int, codec: str) -> int:
    """Bytes of one sample's array: a lossy codec's packing, else the values (zstd: at most that)."""
    c = codec_named(codec)
    return int(np.prod(c.zarr_shape(shape))) if c.lossy else int(np.prod(shape)) * item
