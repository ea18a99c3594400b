"""`sweep`: plan, extract what the store lacks, train every unfinished point, write the report.

    result = run_sweep(load_recipe("pipelines/table5_sensitivity.yaml"), "results/table5")

Order of work, and why:
1. Finished points (their run holds a `point.json` with the same fingerprint) are kept as they
   are: an interrupted sweep redoes only the rest, a finished one only rebuilds its report.
2. Extraction runs first, one merged request per dataset part (`plan.extraction_requests`), so
   captions, text conditions and latents are computed once for the whole grid; with `workers` or
   `scheduler` its shards go to the same dask cluster the training uses.
3. What training adds to the store (class-prompt features, segmentation masks) is written here
   too, so that the training tasks, which may run in parallel, only read the store.
4. Training groups (heads that share a pass) are tasks on dask.distributed: a local cluster by
   default, or the one at `scheduler`. A task may run twice (a lost worker): it rewrites the same
   run directory, and its `point.json` is written last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.progress import Progress, get_logger, work_sink
from vermouth_cache.core.atomic import atomic_write_json
from vermouth_cache.extract.run import extract
from vermouth_cache.store.listing import human_bytes
from vermouth_cache.sweep.plan import (POINT_FILE, ResolvedModels, TrainGroup, extraction_requests, fingerprint,
                                       finished, run_dir, train_groups)
from vermouth_cache.sweep.recipe import Point, Recipe
from vermouth_cache.train.common import HeadJob, RunOptions
from vermouth_cache.train.settings import TaskSettings
from vermouth_cache.train.tasks import get_task

log = get_logger(__name__)
PROGRESS_TOPIC = "vermouth-sweep-progress"  # dask events: how far each training task is


@dataclass(frozen=True)
class SweepOptions:
    out: str
    store: str | None = None  # default: OUT/store
    workers: int | None = None  # local dask workers; default: one per GPU, else 1
    scheduler: str | None = None  # address of a running dask scheduler instead of a local cluster
    device: str | None = None
    memory_gb: float = 8.0
    progress: bool = True

    @property
    def store_path(self) -> str:
        return self.store or str(Path(self.out) / "store")


@dataclass
class SweepResult:
    records: list[dict]
    report: dict
    extracted: list[dict] = field(default_factory=list)  # per request: dataset, seconds, samples computed
    trained: int = 0  # points trained by this call
    seconds: dict = field(default_factory=dict)


def resolve_models(recipe: Recipe, out: Path) -> ResolvedModels:
    if recipe.models.tiny:
        d = out / "models"
        if not (d / "sd" / "model_index.json").is_file():
            from vermouth_cache.models.tiny import write_tiny_models

            write_tiny_models(d)
        return ResolvedModels.of(recipe.models, d)
    return ResolvedModels.of(recipe.models)


def run_sweep(recipe: Recipe, opts: SweepOptions) -> SweepResult:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    models = resolve_models(recipe, out)
    t0 = time.perf_counter()
    done = {p.name: finished(out, recipe, p, models) for p in recipe.points}
    todo = [p for p in recipe.points if done[p.name] is None]
    result = SweepResult(records=[], report={})
    if todo:
        from vermouth_cache.store.entries import Store

        Store(opts.store_path, create=True)
        for req in extraction_requests(todo, models, recipe.extract, opts.store_path, opts.device, opts.progress,
                                       workers=opts.workers, scheduler=opts.scheduler):
            rep = extract(req)
            result.extracted.append({"dataset": rep.dataset["name"], "t": list(req.t), "seconds": rep.wall_seconds,
                                     "computed": dict(rep.computed)})
        result.seconds["extract"] = time.perf_counter() - t0
        groups = train_groups(todo)
        t1 = time.perf_counter()
        _prepare(groups, models, opts, recipe)
        for rec in _train(recipe, groups, models, opts, out):
            done[rec["point"]] = rec
            result.trained += rec["status"] == "done"
        result.seconds["train"] = time.perf_counter() - t1
    # the recipe's order of varied keys (point.json stores them sorted)
    result.records = [{**done[p.name], "varied": _jsonable(p.varied)} if done[p.name] else _failed_record(p, "not run")
                      for p in recipe.points]
    from vermouth_cache.sweep.report import write_report

    result.report = write_report(result.records, out, title=recipe.name)
    atomic_write_json(out / "sweep.json", {"recipe": recipe.source, "name": recipe.name, "store": opts.store_path,
                                           "models": models.__dict__, "points": [p.name for p in recipe.points],
                                           "this_call": {"extracted": result.extracted, "trained": result.trained,
                                                         "seconds": result.seconds}})
    return result


def run_options(models: ResolvedModels, opts: SweepOptions, progress: bool, recipe: Recipe | None = None) -> RunOptions:
    """Training reads the features the sweep's extractions make: its SD model, and its `extract:`
    options (else their defaults) for every field of `selection.PINS`."""
    select = ()
    if recipe is not None:
        from vermouth_cache.extract.selection import pins_of_extract

        blip = any(p.settings.prompt == "blip" for p in recipe.points)  # the captioner is loaded only then
        select = tuple(pins_of_extract(recipe.extract, captioner=models.captioner if blip else None).items())
    return RunOptions(store=opts.store_path, sd_model=models.sd_model, clip_model=models.clip_model,
                      device=opts.device, memory_gb=opts.memory_gb, progress=progress, overwrite=True, select=select)


def _prepare(groups: list[TrainGroup], models: ResolvedModels, opts: SweepOptions, recipe: Recipe | None = None) -> None:
    ro = run_options(models, opts, opts.progress, recipe)
    for g in groups:
        seen = set()
        for p in g.points:
            s = p.settings
            key = (s.text_proj, s.templates)  # what the class-prompt features depend on
            if key not in seen:
                seen.add(key)
                get_task(g.dataset.task).prepare(g.dataset.data_options.data(), s, ro)


@dataclass(frozen=True)
class GroupJob:
    """What a dask task needs to train one group: plain data, no open files."""
    task: str  # its name in the task registry
    data: object  # what the task's train_heads takes (FewshotData, ...)
    heads: tuple[tuple[str, TaskSettings, str], ...]  # (point name, settings, run directory)
    options: RunOptions
    records: tuple[dict, ...]  # the point records to complete, one per head
    threads: int
    index: int = 0  # the task's number in its sweep, for progress events


def _train(recipe: Recipe, groups: list[TrainGroup], models: ResolvedModels, opts: SweepOptions, out: Path):
    """Yield each point's record as its group finishes."""
    jobs = []
    from vermouth_cache.extract.cluster import client_for

    client, cluster = client_for(opts.workers, opts.scheduler)
    n_workers = max(1, len(client.scheduler_info().get("workers", {})) or 1)
    threads = max(1, (os.cpu_count() or 1) // n_workers) if opts.scheduler is None else 0
    for i, g in enumerate(groups):
        heads = tuple((p.name, p.settings, str(run_dir(out, p))) for p in g.points)
        recs = tuple(_base_record(recipe, p, models, out) for p in g.points)
        jobs.append(GroupJob(g.dataset.task, g.dataset.data_options.data(), heads, run_options(models, opts, False, recipe), recs,
                             threads, i))
    n_points = sum(len(g.points) for g in groups)
    bar = Progress("sweep: train", n_points, "points", enabled=opts.progress)
    # Each task reports its steps (train_group's work_sink): the bar counts points done plus the
    # fractions of those in training, so it moves while a point trains, not only when it ends.
    done_of = [0.0] * len(jobs)
    lock = threading.Lock()

    def progressed(event) -> None:
        msg = event[1] if isinstance(event, tuple) else event
        with lock:
            i = int(msg["job"])
            done_of[i] = max(done_of[i], float(msg["done"]))
            bar.set(sum(f * len(j.heads) for f, j in zip(done_of, jobs)))

    client.subscribe_topic(PROGRESS_TOPIC, progressed)
    finished_points = 0
    try:
        from distributed import as_completed

        futures = client.map(train_group, jobs, pure=False)
        index_of = {f.key: j.index for f, j in zip(futures, jobs)}
        for fut in as_completed(futures):
            records = fut.result()
            with lock:
                done_of[index_of[fut.key]] = 1.0
                bar.set(sum(f * len(j.heads) for f, j in zip(done_of, jobs)))
            for rec in records:
                finished_points += 1
                log.info(f"sweep: point {rec['point']} {rec['status']} ({finished_points}/{n_points}, "
                         f"{rec['seconds']:.1f} s)")
                yield rec
    finally:
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(PROGRESS_TOPIC)
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()


def train_group(job: GroupJob) -> list[dict]:
    """A dask task: train one group's heads in one pass; write and return their point records.
    Errors become "failed" records, never exceptions: one bad point must not stop the sweep."""
    import torch

    if job.threads:
        torch.set_num_threads(job.threads)
    opts = job.options
    if opts.device is None and torch.cuda.is_available():
        from vermouth_cache.extract.cluster import worker_device

        opts = dataclasses.replace(opts, device=str(worker_device(None)))
    task = get_task(job.task)
    t0 = time.perf_counter()
    try:
        with work_sink(_progress_events(job.index)):
            all_metrics = task.train_heads(job.data, [HeadJob(s, d) for _, s, d in job.heads], opts)
    except Exception as exc:  # noqa: BLE001 - recorded per point, the sweep goes on
        why = str(exc) if isinstance(exc, VermouthError) else "".join(
            traceback.format_exception_only(type(exc), exc)).strip()
        all_metrics = [{"error": why}] * len(job.heads)
    seconds = (time.perf_counter() - t0) / len(job.heads)
    records = []
    for (name, _, directory), base, metrics in zip(job.heads, job.records, all_metrics):
        rec = {**base, "seconds": round(seconds, 3), "heads_in_pass": len(job.heads)}
        if "error" in metrics:
            rec.update(status=f"failed: {metrics['error']}", scores=[])
        else:
            rec.update(status="done", scores=task.scores(metrics, base["dataset"], base["eval_labels"]),
                       entries=_entries(metrics))
        rec["paper"] = [p for p in rec.pop("paper_candidates") if any(
            p["dataset"] == s["dataset"] and p["metric"] == s["metric"] for s in rec["scores"])]
        Path(directory).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(directory) / POINT_FILE, rec)
        records.append(rec)
    return records


def _progress_events(index: int):
    """A work sink sending this task's progress to the sweep's client as dask events, at most
    twice a second; outside a dask worker, one that drops it."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return lambda done: None
    last = [0.0]

    def send(done: float) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.5 or done >= 1.0:
            last[0] = now
            worker.log_event(PROGRESS_TOPIC, {"job": index, "done": done})
    return send


def _entries(metrics: dict) -> dict:
    """The features and expert keys read (of the first split: all splits share a recipe)."""
    first = next(iter(metrics.get("entries", {}).values()), {})
    return {k: v for k, v in first.items() if k in ("features", "expert")}


def _base_record(recipe: Recipe, p: Point, models: ResolvedModels, out: Path) -> dict:
    labels = [lab for lab, _ in p.dataset.evals()]
    return {"point": p.name, "dataset": p.dataset.label, "task": p.dataset.task, "varied": _jsonable(p.varied),
            "settings": p.settings.to_json(), "fingerprint": fingerprint(recipe, p, models),
            "entries": {}, "run": os.path.relpath(run_dir(out, p), out), "eval_labels": labels,
            "paper_candidates": paper_for(recipe, p)}


def paper_for(recipe: Recipe, p: Point) -> list[dict]:
    """The paper's numbers this point reproduces: same dataset (or eval set), same settings where
    the paper entry names them; the first entry per (dataset, metric) wins."""
    labels = {p.dataset.label} | {lab for lab, _ in p.dataset.evals()}
    out, taken = [], set()
    s = p.settings.to_json()
    for item in recipe.paper:
        metric = item.get("metric", get_task(p.dataset.task).main_metric)
        conds = {k: v for k, v in item.items() if k not in ("dataset", "metric", "value")}
        if item["dataset"] not in labels or (item["dataset"], metric) in taken:
            continue
        if all(_same(s.get(k), v) for k, v in conds.items()):
            taken.add((item["dataset"], metric))
            out.append({"dataset": item["dataset"], "metric": metric, "value": item["value"]})
    return out


def _same(ours, theirs) -> bool:
    norm = lambda v: "none" if v is None else (",".join(sorted(v.split(","))) if isinstance(v, str) else v)  # noqa: E731
    return norm(ours) == norm(theirs)


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in d.items()}


def _failed_record(p: Point, why: str) -> dict:
    return {"point": p.name, "dataset": p.dataset.label, "task": p.dataset.task, "varied": _jsonable(p.varied),
            "settings": p.settings.to_json(), "status": f"failed: {why}", "scores": [], "paper": [], "entries": {},
            "seconds": None, "heads_in_pass": None, "run": None}


def dry_run(recipe: Recipe, opts: SweepOptions) -> str:
    """The plan as text: points done, entries present, entries to extract with their estimated
    size, and the training passes; nothing is extracted or trained."""
    from vermouth_cache.extract.survey import survey

    out = Path(opts.out)
    models = resolve_models(recipe, out)
    todo = [p for p in recipe.points if finished(out, recipe, p, models) is None]
    lines = [f"sweep {recipe.name}: {len(recipe.points)} points, {len(recipe.points) - len(todo)} finished, "
             f"{len(todo)} to train", f"store: {opts.store_path}"]
    total = 0
    seen = set()
    reqs = extraction_requests(todo, models, recipe.extract, opts.store_path, opts.device, False)
    if reqs:
        lines.append("cache entries:")
    for req in reqs:
        part = req.dataset + (f" [{req.split}]" if req.split else "") + (f" {req.shots}-shot" if req.shots else "")
        lines.append(f"  {part}: t={','.join(map(str, req.t))} stages={req.stages}"
                     + (f" attn={req.attn_maps}" if req.attn_maps else "") + (f" expert={req.expert}" if req.expert else ""))
        for e in survey(req):
            if (e.kind, e.key) in seen:
                continue
            seen.add((e.kind, e.key))
            size = f", {human_bytes(e.bytes_to_write)} to write" if e.bytes_to_write else ""
            what = f" t={e.about['t']}" if e.kind == "features" else ""
            lines.append(f"    {e.kind:<9}{e.key}{what}: {e.state}{size}")
            total += e.bytes_to_write
    lines.append(f"to extract: about {human_bytes(total)} (uncompressed)")
    groups = train_groups(todo)
    if groups:
        lines.append(f"training passes: {len(groups)}")
        for g in groups:
            lines.append(f"  {g.dataset.label} ({g.dataset.task}): " + ", ".join(p.name for p in g.points))
    return "\n".join(lines)

