"""One shard of an extraction, computed under claims: decode, caption, encode text, encode latents,
run the U-net per t, and write each array's shard whole before its record.

`ShardRunner.run` is the one path every shard takes, in this process or in a dask task, so what a
shard's bytes are never depends on who computed it. The method's rules (conditioning, latent rule,
noise, attention maps) come from its declaration (`methods`); the model calls from `compute`.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from vermouth_cache.core.errors import ImageError, VermouthError
from vermouth_cache.data.images import decode_sample
from vermouth_cache.data.views import view_geometry
from vermouth_cache.extract import compute
from vermouth_cache.extract.plan import CAPTIONS, EXPERT_LEVELS, LATENTS, TEXT, Plan, shard_need, writes
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.extract.writer import ShardWriter
from vermouth_cache.methods import method_named
from vermouth_cache.methods.conditioning import conditioning_of
from vermouth_cache.models.compiled import check_compile
from vermouth_cache.models.loading import Captioner, Expert, Placement, resolve_device, resolve_precision
from vermouth_cache.models.pipeline import StableDiffusion
from vermouth_cache.store.claims import Claims
from vermouth_cache.store.arrays import STORAGE_DTYPES
from vermouth_cache.store.entry import Entry
from vermouth_cache.store.records import OK


@dataclass
class ExtractReport:
    store: str
    dataset: dict
    entries: dict[str, str]
    computed: Counter = field(default_factory=Counter)  # samples through each model
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    failed: dict[str, str] = field(default_factory=dict)  # sample id -> reason
    wall_seconds: float = 0.0
    shards: list[int] = field(default_factory=list)  # shards this call computed (not found done or done by others)
    waited_seconds: float = 0.0  # spent waiting for shards other writers held
    error_rate: float | None = None  # failed images / all, when --max-error-rate is set
    notes: list[str] = field(default_factory=list)  # decisions the log states (e.g. a shard size kept)


@dataclass
class _Decoded:
    """One decoded image (or view), as BLIP takes it (it resizes it itself) and, when the shard runs
    the VAE or the expert, as they take it: made in the decoding thread, off the models' thread."""
    image: object  # PIL.Image.Image
    pixels: torch.Tensor | None  # (3, r, r) in [-1, 1]: `compute.pixel_batch` of this one image


def _decode(samples, resolution: int | None = None) -> list:
    """`_Decoded` images (with their pixels at `resolution`, if given), or ImageError objects in
    place of the ones that fail."""
    geometry = view_geometry(samples)

    def one(s):
        try:
            img = decode_sample(s)
            img = s.view.image(img) if s.view is not None else img
            return _Decoded(img, compute.pixel_batch([img], resolution, geometry)[0] if resolution else None)
        except ImageError as exc:
            return exc
        except VermouthError as exc:  # a view outside the image (it shrank since the dataset was listed)
            return ImageError(s.id, str(exc))
    firsts, where = _distinct_images(samples)  # a referring set has one image per sentence: decode it once
    with ThreadPoolExecutor(max_workers=4) as pool:
        decoded = list(pool.map(one, [samples[i] for i in firsts]))
    return [ImageError(s.id, d.reason) if isinstance(d, ImageError) else d
            for s, d in zip(samples, (decoded[w] for w in where))]


def _distinct_images(samples) -> tuple[list[int], list[int]]:
    """(index of the first sample of each distinct (image, view), the position of every sample's
    among them): samples that share an image and view share its pixels, latent and expert maps."""
    position: dict = {}
    firsts, where = [], []
    for i, s in enumerate(samples):
        key = (s.path, s.member, s.view)
        if key not in position:
            position[key] = len(firsts)
            firsts.append(i)
        where.append(position[key])
    return firsts, where


def _once_per_image(samples, ok: list[int], fn) -> dict[str, np.ndarray]:
    """fn(indices) -> {name: rows} run on the distinct images of `ok` only, its rows repeated for the
    samples sharing one (one VAE and expert pass per image, however many sentences refer to it)."""
    firsts, where = _distinct_images([samples[i] for i in ok])
    out = fn([ok[i] for i in firsts])
    return {name: rows[where] for name, rows in out.items()}


class _Stage:
    """Accumulates seconds and sample counts for one named step."""

    def __init__(self, report: ExtractReport, name: str, n: int = 0):
        self.report, self.name, self.n = report, name, n

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.report.seconds[self.name] += self.seconds
        self.report.computed[self.name] += self.n

    def run(self, base: dict) -> dict:
        """The shard record's run facts: device and precision, plus this step's seconds."""
        return {**base, "step": self.name, "seconds": round(self.seconds, 4)}


@dataclass
class Models:
    """The frozen models of one extraction, each loaded on first use."""
    sd: StableDiffusion
    captioner: Captioner | None
    expert: Expert | None
    placement: Placement

    @classmethod
    def of(cls, req: ExtractRequest, device=None) -> "Models":
        device = device if device is not None else resolve_device(req.device)
        placement = Placement(device, resolve_precision(req.precision, device))
        sd = StableDiffusion(req.sd_model, placement)
        if req.compile:
            check_compile(device)
            sd.compile_layers = {"eager_transformers": req.attn_maps not in (None, "", "none")}
        return cls(sd,
                   Captioner(req.captioner, placement) if conditioning_of(req.prompt).needs_captioner else None,
                   Expert(req.expert, req.expert_model, placement) if req.expert else None, placement)


PREFETCH = True  # decode the next shard's images while this one computes (tests switch it off to compare)
BACKGROUND_WRITES = True  # write a shard's chunks while the next model call computes (likewise)


class ShardRunner:
    """Computes shards of one extraction under claims: the single-process loop and every dask
    task both go through `run`, so what a shard's bytes are never depends on who computed it."""

    def __init__(self, req: ExtractRequest, samples_of, plan: Plan, models: Models, claims: Claims,
                 only: dict | None = None, background_writes: bool = False):
        """`samples_of(shard)`: that shard's samples (all of them in this process, or a dask task's).
        `background_writes`: a shard's chunks are written while the next one computes; its claims are
        released once they are (call `flush` to wait for them, `close` at the end)."""
        self.req, self.samples_of, self.plan, self.models, self.claims = req, samples_of, plan, models, claims
        self.only = only
        self.batch = compute.call_size(models.placement.device, req.batch_size)
        self.run_facts = models.placement.describe()
        if models.placement.device.type == "cpu":
            self.run_facts["cpu_threads"] = req.cpu_threads
        if models.sd.compile_layers is not None:
            self.run_facts["compiled"] = True
        self._ahead: dict[int, Future] = {}  # shard -> its images, decoding while the shard before computes
        self._decoder: ThreadPoolExecutor | None = None
        self.writer = ShardWriter(background=background_writes, lost_error=LostClaim)

    def prefetch(self, shard: int) -> None:
        """Start decoding `shard`'s images in the background (the models of the shard before keep the
        CPU or GPU busy meanwhile); `run(shard)` takes them. Decoding is the same call either way, so
        the bytes never depend on it."""
        if not PREFETCH or shard in self._ahead:
            return
        need = shard_need(self.plan, shard, self.only)
        if not (need and _needs_images(self.req, need)):
            return  # committed already, or only the U-net is left (it reads latents, not images)
        if self._decoder is None:
            self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vermouth-cache-decode")
        self._ahead[shard] = self._decoder.submit(_decode, self.samples_of(shard), _pixel_size(self.req, need))

    def flush(self, report: ExtractReport) -> set[int]:
        """Wait for every queued write; the shards whose claim was taken over before they committed
        (to compute again, or to leave to the writer that took them)."""
        t0 = time.perf_counter()
        try:
            self.writer.drain()
        finally:
            report.seconds["write wait"] += time.perf_counter() - t0 + self.writer.waited
            self.writer.waited = 0.0
        lost = self.writer.take_lost()
        report.shards[:] = [s for s in report.shards if s not in lost]
        return lost

    def close(self, *, raise_errors: bool = True) -> None:
        if self._decoder is not None:
            self._decoder.shutdown(wait=True, cancel_futures=True)
            self._decoder = None
        self._ahead.clear()
        self.writer.close(raise_errors=raise_errors)

    def run(self, shard: int, report: ExtractReport) -> str:
        """"done" (computed here), "nothing" (already committed), "busy" (a live writer holds a
        part of it) or "lost" (taken over while computing: the taker commits it)."""
        decoded = self._ahead.pop(shard, None)
        need = shard_need(self.plan, shard, self.only)
        if not need:
            return "nothing"
        held = []
        try:
            for entry in writes(self.plan, need):
                claim = self.claims.acquire(entry.prefix, shard)
                if claim is None:
                    if decoded is not None:
                        self._ahead[shard] = decoded  # for when the other writer is done (or dead)
                    return "busy"
                held.append(claim)
            need = shard_need(self.plan, shard, self.only)  # committed by a writer that just released it?
            if not need:
                return "nothing"

            def guard():
                if not all(self.claims.held(c) for c in held):
                    raise LostClaim(shard)

            _extract_shard(self.req, self.samples_of(shard), self.plan, self.models, shard, need, self.batch,
                           self.run_facts, report, guard, self.writer, decoded=decoded)
            report.shards.append(shard)
            return "done" if shard not in self.writer.lost else "lost"
        except LostClaim:
            return "lost"
        finally:
            # after the shard's writes: the claims guard them until their records are committed
            self.writer.after(lambda held=held: [self.claims.release(c) for c in held])


class LostClaim(Exception):
    """Our claim on a shard was taken over (we stalled past its expiry): do not commit."""


def wait_poll(ttl: float) -> float:
    pause = min(2.0, ttl / 4)
    time.sleep(pause)
    return pause


def _write(entry: Entry, name: str, shard: int, ok_index: list[int], n: int, status: list[str],
           data: np.ndarray | None, run: dict, guard) -> None:
    """Scatter the ok samples' rows (float32, on the host) into a NaN-filled shard block and write it whole."""
    full = None
    if data is not None and len(ok_index):
        full = np.full((n, *data.shape[1:]), np.nan, dtype=np.float32)
        full[ok_index] = data
    entry.write_shard(name, shard, status, data=full, run=run, before_commit=guard)


def _pixels(decoded: _Decoded):
    """The pixels made while decoding, or the image itself (the model call makes them)."""
    return decoded.pixels if decoded.pixels is not None else decoded.image


def _host(rows) -> np.ndarray:
    """float32 rows on the host, from numpy or from a (device) tensor."""
    return rows.detach().float().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows, np.float32)


@dataclass
class _Carried:
    """An upstream array computed in this shard, kept where it was computed (the GPU) for the U-net:
    the rows of the samples `ok` had then. Its float32 values are exactly the ones written, so the
    U-net reads the same numbers as from the store, without waiting for the write to land."""
    ok: list[int]
    rows: object  # np.ndarray or torch.Tensor

    def take(self, ok: list[int]):
        """The rows of `ok`, a subset of the samples it was computed for (a status only gets worse)."""
        if ok == self.ok:
            return self.rows
        pos = {i: k for k, i in enumerate(self.ok)}
        return self.rows[[pos[i] for i in ok]]


def _pixel_size(req, need: dict) -> int | None:
    """The resolution of the pixels a shard's VAE or expert takes, None if it runs neither."""
    return req.resolution if need["latents"] or need["expert"] else None


def _needs_images(req, need: dict) -> bool:
    """Whether a shard's remaining work reads its images (VAE, expert, or BLIP captions)."""
    return bool(need["latents"] or need["expert"] or (need["captions"] and conditioning_of(req.prompt).needs_captioner))


def _extract_shard(req, samples, plan: Plan, models: Models, shard: int, need: dict, batch: int,
                   run: dict, report: ExtractReport, guard, writer: ShardWriter,
                   decoded: Future | None = None) -> None:
    ids = [s.id for s in samples]
    n = len(samples)
    sd, captioner, expert = models.sd, models.captioner, models.expert
    method, cond = method_named(req.method), conditioning_of(req.prompt)
    geometry = view_geometry(samples)  # a dataset of views (data/views.py), else None
    need_images = _needs_images(req, need)
    status = [OK] * n
    images = [None] * n
    carried: dict[str, _Carried] = {}  # what this shard computed that a later step reads
    step = _Steps(report, shard, status, run, guard, writer, carried)
    if need_images:
        with _Stage(report, "decode", n):  # with `decoded`, only the wait for the background decoding
            images = decoded.result() if decoded is not None else _decode(samples, _pixel_size(req, need))
        for i, img in enumerate(images):
            if isinstance(img, ImageError):
                if req.on_error == "fail" and req.max_error_rate is None:
                    raise VermouthError(f"{img} (shard {shard}; use --on-error skip to record it and go on)")
                status[i] = f"error: {img.reason}"
                report.failed[img.sample_id] = img.reason

    # captions: per-sample strings kept in the shard record
    if need["captions"]:
        ok = step.ok()
        with _Stage(report, "caption", len(ok) if cond.needs_captioner else 0) as timed:
            if cond.needs_captioner:
                caps = compute.blip_captions(captioner, [images[i].image for i in ok], prefix=req.caption_prefix,
                                             min_new=req.caption_min_tokens, max_new=req.caption_max_tokens,
                                             batch=batch)
            else:
                caps = cond.texts(req, [samples[i] for i in ok])
        values = [None] * n
        for i, c in zip(ok, caps):
            values[i] = c
        carried[CAPTIONS] = _Carried(ok, values)
        write_run, row_status = timed.run(run), list(status)
        step.write(lambda: plan.captions.write_shard(CAPTIONS, shard, row_status, values=values, run=write_run,
                                                     before_commit=guard))

    f32 = "float32"
    if need["text"]:
        if CAPTIONS in carried:
            texts = carried[CAPTIONS].rows
        else:
            rec = plan.captions.record(CAPTIONS, shard)
            step.worsen(rec.status)  # carry caption failures
            texts = rec.values
        step.compute(plan.text, [TEXT], "text", f32, lambda ok: {
            TEXT: cond.encode(sd, [texts[i] for i in ok], req, batch=batch)})
    if need["latents"]:
        step.compute(plan.latents, [LATENTS], "vae", f32, lambda ok: _once_per_image(
            samples, ok, lambda idx: {LATENTS: compute.vae_latents(sd, [_pixels(images[i]) for i in idx], resolution=req.resolution,
                                                                   rule=method.latent, batch=batch, geometry=geometry)}))
    dtype = STORAGE_DTYPES[req.dtype]
    if need["expert"]:
        step.compute(plan.expert, EXPERT_LEVELS, "expert", dtype, lambda ok: _once_per_image(
            samples, ok, lambda idx: compute.expert_features(
                expert, [_pixels(images[i]) for i in idx], resolution=req.resolution, batch=batch, geometry=geometry)),
            codec=req.codec, keep=False)
    if not need["features"]:
        return
    # conditions and latents computed in this shard come as they were computed (their stored
    # float32 values, still on the device); the others are read back from the store: the same bytes
    with _Stage(report, "read"):
        text = step.upstream(plan.text, TEXT)
        lat = step.upstream(plan.latents, LATENTS)
    for t, taps in need["features"].items():
        step.compute(plan.features[t], taps, "unet", dtype,
                     lambda ok, t=t, taps=taps:
                     compute.unet_features(sd, lat, text, [ids[i] for i in ok], t=t, taps=taps, noise=req.noise,
                                           seed=req.seed, draws=req.noise_draws,
                                           inversion_steps=req.inversion_steps, attention=method.attention,
                                           batch=batch),
                     passes=req.noise_draws, codec=req.codec, keep=False)


@dataclass
class _Steps:
    """The model steps of one shard: the samples still ok, what each step computed, its writes."""
    report: ExtractReport
    shard: int
    status: list[str]
    run: dict
    guard: object
    writer: ShardWriter
    carried: dict[str, _Carried]

    def ok(self) -> list[int]:
        return [i for i, s in enumerate(self.status) if s == OK]

    def worsen(self, recorded: list[str]) -> None:
        """Take on the failures an upstream record holds (in place: every step sees them)."""
        for i, s in enumerate(recorded):
            if s != OK and self.status[i] == OK:
                self.status[i] = s

    def upstream(self, entry: Entry, name: str):
        """The ok samples' rows of an upstream array: as computed in this shard, or read from the store."""
        if name in self.carried:
            ok = self.ok()
            return self.carried[name].take(ok) if ok else None
        self.worsen(entry.record(name, self.shard).status)
        ok = self.ok()
        start = entry.shard_bounds(self.shard)[0]
        return entry.read(name, [start + i for i in ok]) if ok else None

    def compute(self, entry: Entry, names: list[str], step_name: str, dtype: str, fn, passes: int = 1,
                codec: str = "raw", keep: bool = True) -> None:
        """fn(ok indices) -> {array name: rows of those samples}; then each array's shard is written
        whole, failed samples NaN, with a record (even when every sample failed). `keep`: a later
        step of this shard reads the rows."""
        ok = self.ok()
        with _Stage(self.report, step_name, len(ok) * passes) as step:
            arrays = fn(ok) if ok else {}
        write_run, status = step.run(self.run), list(self.status)
        for name in names:
            rows = arrays.get(name) if ok else None
            if keep:  # even with no row: a later step must not look for it in the store, still being written
                self.carried[name] = _Carried(ok, rows)
            if rows is not None:
                # created here, not in the writer thread: a shape clash raises at its step
                entry.ensure_array(name, tuple(rows.shape[1:]), dtype, codec)
                rows = _host(rows)  # off the device now: the write holds host memory only
            self.write(lambda name=name, rows=rows: _write(entry, name, self.shard, ok, len(status), status, rows,
                                                           write_run, self.guard))

    def write(self, fn) -> None:
        """fn() writes one array's shard: in the writer (a thread, or in place), timed as "write"."""
        def timed():
            with _Stage(self.report, "write"):
                fn()
        self.writer.submit(self.shard, timed)
