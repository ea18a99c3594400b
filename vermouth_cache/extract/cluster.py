"""dask.distributed for extraction and sweeps: a local cluster or the one at a scheduler address.

    vermouth-cache extract DATASET --store /shared/cache --workers 4          # local, one GPU each
    vermouth-cache extract DATASET --store s3://bucket/cache --scheduler tcp://head:8786

Extraction sends one task per shard. A task rebuilds the plan from entry keys (no dataset
hashing on the worker), loads the models once per worker process, and runs the same
`ShardRunner` as a single-process extraction, so every shard is claimed before it is computed
and written whole before its record. dask may run a task twice (a worker died, the scheduler
lost track of it): the second run finds the shard committed, or claimed by a dead process and
takes it over (at once on the same machine, after the claim's expiry on another), and computes
the same bytes. Workers need the dataset at the same path (a shared filesystem) and the store
at the same path or URL.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.errors import require
from vermouth_cache.core.progress import Progress
from vermouth_cache.extract.compute import torch_threads
from vermouth_cache.extract.plan import plan_from_keys, plan_keys
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.extract.shards import ExtractReport, Models, ShardRunner, wait_poll
from vermouth_cache.models.loading import resolve_device
from vermouth_cache.store.claims import Claims
from vermouth_cache.store.entries import Store


def client_for(workers: int | None, scheduler: str | None):
    """(client, cluster): the cluster at `scheduler`, or a new local one of `workers` processes."""
    require("distributed", "running on dask workers (--workers, --scheduler, sweeps)")  # the `dist` extra
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError) as exc:
            raise VermouthError(f"cannot reach the dask scheduler at {scheduler}: {exc}") from None
    n = workers or default_workers()
    # CRITICAL: workers that outlive the scheduler by a heartbeat at shutdown must not print tracebacks
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.CRITICAL)
    return Client(cluster), cluster


def default_workers() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def worker_device(requested: str | None):
    """The torch device of this dask worker: `requested` if given, else GPU (worker index mod the
    GPUs this machine has: a local cluster puts one worker on each), else the CPU."""
    if requested:
        return resolve_device(requested)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        from distributed import get_worker

        index = int(get_worker().name)
    except (ValueError, ImportError):
        index = 0
    return torch.device(f"cuda:{index % torch.cuda.device_count()}")


@dataclass(frozen=True)
class ShardTask:
    """One dask task's input: plain data (a request, entry keys, the samples), no open files."""
    req: ExtractRequest
    keys: dict
    samples: tuple  # the shard's samples
    shard: int
    only: dict | None


_WORKER_STATE: dict = {}  # per worker process: (models, claims) per request


def run_shard_task(task: ShardTask) -> dict:
    """On a worker: compute one shard (waiting while a live writer holds it); a small report."""
    req = task.req
    key = (req.sd_model, req.captioner, req.expert, req.expert_model, req.device, req.precision, req.store)
    if key not in _WORKER_STATE:
        store = Store(req.store)
        claims = Claims(store.loc)
        claims.start()  # renews for the life of the worker process
        for _, _, old in _WORKER_STATE.values():
            old.stop()
        _WORKER_STATE.clear()  # one extraction's models at a time per worker
        _WORKER_STATE[key] = (store, Models.of(req, worker_device(req.device)), claims)
    store, models, claims = _WORKER_STATE[key]
    runner = ShardRunner(req, lambda _: task.samples, plan_from_keys(store, task.keys), models, claims, task.only)
    report = ExtractReport(store=str(store.root), dataset={}, entries={})
    # the thread count the client fixed, whatever this worker's share of the cores: same bytes
    with torch_threads(req.cpu_threads if models.placement.device.type == "cpu" else None):
        while True:
            outcome = runner.run(task.shard, report)
            if outcome in ("done", "nothing"):
                break
            report.waited_seconds += wait_poll(claims.ttl)
    return {"computed": dict(report.computed), "seconds": dict(report.seconds), "failed": dict(report.failed),
            "shards": list(report.shards), "waited": report.waited_seconds}


def extract_on_cluster(req, ds, plan, todo: dict, report, only: dict | None) -> None:
    """Run the missing shards as dask tasks and merge their reports into `report`."""
    client, cluster = client_for(req.workers, req.scheduler)
    keys = plan_keys(plan)
    size = plan.captions.shard_size
    shards = sorted(todo)
    tasks = [ShardTask(req.with_(workers=None, scheduler=None, progress=False), keys,
                       ds.samples[slice(*plan.captions.shard_bounds(s))], s, only) for s in shards]
    bar = Progress(f"extract {ds.name} on {len(client.scheduler_info().get('workers', {}))} dask worker(s)",
                   sum(min(len(ds), (s + 1) * size) - s * size for s in todo), "img", enabled=req.progress)
    t0 = time.perf_counter()
    try:
        from distributed import as_completed

        futures = client.map(run_shard_task, tasks, pure=False)
        shard_of = {f.key: s for f, s in zip(futures, shards)}
        for fut in as_completed(futures):
            try:
                part = fut.result()
            except VermouthError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker after dask's retries
                raise VermouthError(f"a dask task of {ds.name} failed: {type(exc).__name__}: {exc}; finished "
                                    "shards are kept, run the same command again to resume") from None
            for k, v in part["computed"].items():
                report.computed[k] += v
            for k, v in part["seconds"].items():
                report.seconds[k] += v
            report.failed.update(part["failed"])
            report.shards.extend(part["shards"])
            report.waited_seconds += part["waited"]
            lo, hi = plan.captions.shard_bounds(shard_of[fut.key])
            bar.update(hi - lo)
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()
    report.seconds["cluster wall"] = time.perf_counter() - t0
