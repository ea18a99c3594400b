"""`extract`: images -> captions -> text conditions -> latents -> one noised U-net pass per t -> store.

    vermouth-cache extract DATASET --store STORE --t 200 --stages mid,up

Shard by shard (shard = `shard_size` consecutive samples, sorted by id), each artifact is computed
only where its completion record is missing, and written whole before its record. Captions, text
conditions and latents do not depend on t or taps: a second t, or an extra tap, runs only the
U-net. An interrupted run, rerun, recomputes exactly the shards without records, giving the same
bytes an uninterrupted run gives.

Every shard is claimed before it is computed (`claims`), so several extractors, processes or
machines, may fill one store, even one entry, at once: each shard is computed by one of them and
the others skip it or wait for it. `--workers N` / `--scheduler ADDRESS` spread the shards over
dask.distributed workers (`cluster`).
"""

from __future__ import annotations

import os
import time

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.progress import Progress, get_logger
from vermouth_cache.extract import compute, shards
from vermouth_cache.extract.cluster import extract_on_cluster
from vermouth_cache.extract.plan import (CAPTIONS, LATENTS, Plan, arrays_of, dataset_record, make_plan, missing,
                                         stored_shard_size)
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.extract.shards import ExtractReport, Models, ShardRunner, wait_poll
from vermouth_cache.store.claims import Claims
from vermouth_cache.store.entries import Store
from vermouth_cache.store.records import OK

log = get_logger(__name__)


def extract(req: ExtractRequest, *, only: dict | None = None) -> ExtractReport:
    """Compute every missing artifact of `req` into its store; the Python API of `extract`.

    `req.workers` / `req.scheduler` spread the shards over dask.distributed workers (see
    `cluster`); otherwise this process computes them. Either way every shard is claimed first, so
    several extractors may work on one store at once. `only` restricts the work to the given
    shards of the given arrays (`repair`).
    """
    wall0 = time.perf_counter()
    ds = req.load_dataset()
    models = Models.of(req)  # refuses an unsupported SD model before the store is touched
    store = Store(req.store, create=True)
    ds_key = store.put_dataset(dataset_record(ds))
    plan = make_plan(req, ds, store.entry, models.sd, models.captioner, models.expert, ds_key,
                 shard_size_of=lambda kind, key: stored_shard_size(store, kind, key))
    report = ExtractReport(
        store=str(store.root),
        dataset={"name": ds.name, "n_samples": len(ds), "identity": ds.identity(), "record": ds_key},
        entries={"captions": plan.captions.key, "text": plan.text.key, "latents": plan.latents.key,
                 **{f"features t={t}": e.key for t, e in plan.features.items()},
                 **({"expert": plan.expert.key} if plan.expert else {})},
    )
    report.notes = list(plan.notes)
    for _, entry, _ in arrays_of(plan):
        entry.touch()
    if only is not None:
        _invalidate(plan, only)
    todo = missing(plan, only)
    log.debug(f"store {store.root}: {ds.name}, {len(ds)} samples, {plan.captions.n_shards} shard(s) of "
              f"{plan.captions.shard_size}; {len(todo)} to compute; entries "
              + ", ".join(f"{name} {key}" for name, key in report.entries.items()))
    # CPU kernels round differently with another thread count: fix it for every process and worker
    req = req.with_(cpu_threads=req.cpu_threads or os.cpu_count() or 1)
    if todo and (req.workers or req.scheduler):
        extract_on_cluster(req, ds, plan, todo, report, only)
    elif todo:
        with compute.torch_threads(req.cpu_threads if models.placement.device.type == "cpu" else None):
            _extract_here(req, ds, store, plan, models, todo, report, only)
    sweeper = Claims(store.loc)  # claims left by writers killed after their last commit
    for prefix in dict.fromkeys(e.prefix for _, e, _ in arrays_of(plan)):
        sweeper.remove_dead(prefix)
    report.wall_seconds = time.perf_counter() - wall0
    _check_error_rate(req, plan, ds, report)
    return report


def _extract_here(req, ds, store: Store, plan: Plan, models: Models, todo: dict, report: ExtractReport,
                  only: dict | None) -> None:
    claims = Claims(store.loc)
    runner = ShardRunner(req, lambda s: ds.samples[slice(*plan.captions.shard_bounds(s))], plan, models, claims,
                         only, background_writes=shards.BACKGROUND_WRITES)
    pending = sorted(todo)
    size = {s: min(len(ds), (s + 1) * plan.captions.shard_size) - s * plan.captions.shard_size for s in pending}
    bar = Progress(f"extract {ds.name}", sum(size.values()), "img", enabled=req.progress)
    finished = False
    try:
        with claims.heartbeat():
            while pending:
                busy = []
                for k, shard in enumerate(pending):
                    if k + 1 < len(pending):
                        runner.prefetch(pending[k + 1])  # its images decode while this shard computes
                    outcome = runner.run(shard, report)
                    if outcome in ("busy", "lost"):
                        busy.append(shard)
                    else:
                        bar.update(size[shard])
                busy += sorted(runner.flush(report))  # taken over before their writes committed
                if busy:  # other writers hold them: come back when they are done (or dead)
                    bar.set_description(f"extract {ds.name} (waiting for {len(busy)} shard(s) other writers hold)")
                    report.waited_seconds += wait_poll(claims.ttl)
                pending = busy
        finished = True
    finally:
        runner.close(raise_errors=finished)  # waits for the queued writes; theirs is not the error on its way
        bar.close()


def _invalidate(plan: Plan, only: dict) -> None:
    """Forget the shards `only` names, after checking that this request still makes their entries."""
    entries = {e.prefix: e for _, e, _ in arrays_of(plan)}
    for prefix, arrays in only.items():
        if prefix not in entries:
            raise VermouthError(f"cannot recompute {prefix}: its request now makes other entries "
                                f"({', '.join(sorted(entries))}); the images or models it was made from have changed")
        for name, numbers in arrays.items():
            for shard in numbers:
                entries[prefix].invalidate(name, shard)


def _check_error_rate(req: ExtractRequest, plan: Plan, ds, report: ExtractReport) -> None:
    """--max-error-rate: the share of images that could not be used, over the whole dataset."""
    if req.max_error_rate is None:
        return
    status = plan.captions.statuses(CAPTIONS)
    for other in (plan.latents.statuses(LATENTS),):
        status = [a if a != OK else b for a, b in zip(status, other)]
    bad = [(ds.samples[i].id, s) for i, s in enumerate(status) if s not in (OK, None)]
    rate = len(bad) / max(1, len(ds))
    report.error_rate = rate
    if rate > req.max_error_rate:
        shown = "; ".join(f"{sid}: {why.removeprefix('error: ')}" for sid, why in bad[:5])
        raise VermouthError(f"{len(bad)} of {len(ds)} images of {ds.name} failed ({rate:.1%} > --max-error-rate "
                            f"{req.max_error_rate:.1%}); each is recorded in the store with its reason, the rest "
                            f"is extracted. First: {shown}")
