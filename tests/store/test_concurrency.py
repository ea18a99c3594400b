"""Several writers on one store: two extractors on one entry and on different entries, a claim left
by a killed writer, and a dask worker killed during `--workers 2`. Every result must equal one
writer's store byte for byte, and no shard may be computed by two live writers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import make_images, record_content, store_bytes
from vermouth_cache.store.claims import Claim, Claims
from vermouth_cache.extract.run import extract
from vermouth_cache.store.local import LocalLocation
from vermouth_cache.store.entries import Store
from vermouth_cache.extract.survey import survey

# An extractor that waits for a start signal (so that two of them really overlap), then reports
# the shards it computed itself.
RACER = textwrap.dedent("""
    import json, os, sys, time
    from vermouth_cache.extract.run import extract
    from vermouth_cache.extract.request import ExtractRequest
    req = ExtractRequest(**json.loads(sys.argv[1]))
    go, out = sys.argv[2], sys.argv[3]
    while not os.path.exists(go):
        time.sleep(0.01)
    rep = extract(req)
    with open(out, "w") as f:
        json.dump({"shards": rep.shards, "computed": dict(rep.computed), "waited": rep.waited_seconds}, f)
""")


@pytest.fixture
def setup(tiny, tmp_path):
    data = make_images(tmp_path / "d", {"a": 5, "b": 4})
    base = dict(dataset=str(data), sd_model=str(tiny["sd"]), captioner=str(tiny["blip"]), resolution=128,
                device="cpu", shard_size=1, stages="mid,up", progress=False)
    env = {**os.environ, "VERMOUTH_CACHE_HOME": str(tmp_path / "home")}
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    return {"data": data, "base": base, "env": env, "script": script, "tmp": tmp_path}


def _race(setup, requests: list[dict]) -> list[dict]:
    tmp = setup["tmp"]
    go = tmp / f"go-{time.time_ns()}"
    outs = [tmp / f"out-{i}-{time.time_ns()}.json" for i in range(len(requests))]
    procs = [subprocess.Popen([sys.executable, str(setup["script"]), json.dumps(r), str(go), str(o)],
                              env=setup["env"], stderr=subprocess.PIPE, text=True) for r, o in zip(requests, outs)]
    time.sleep(3)  # both have imported everything and are polling
    go.write_text("")
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    return [json.loads(o.read_text()) for o in outs]


def test_two_extractors_on_the_same_entry_equal_one_writer(setup):
    s, tmp = setup["base"], setup["tmp"]
    extract_req = {**s, "t": [100], "store": str(tmp / "ref")}
    from vermouth_cache.extract.request import ExtractRequest

    extract(ExtractRequest(**{**extract_req, "t": (100,)}))
    a, b = _race(setup, [{**s, "t": [100], "store": str(tmp / "shared")}] * 2)
    assert store_bytes(tmp / "shared") == store_bytes(tmp / "ref")
    assert record_content(tmp / "shared") == record_content(tmp / "ref")
    # every shard computed once, by one of them, and both did some: they really overlapped
    assert not set(a["shards"]) & set(b["shards"])
    assert sorted(a["shards"] + b["shards"]) == list(range(9))
    assert a["shards"] and b["shards"]
    assert a["computed"]["unet"] + b["computed"]["unet"] == 9
    assert not list((tmp / "shared").rglob("claims/*.json"))


def test_two_extractors_on_different_entries_of_one_store_equal_one_writer(setup):
    s, tmp = setup["base"], setup["tmp"]
    from vermouth_cache.extract.request import ExtractRequest

    extract(ExtractRequest(**{**s, "t": (100, 300), "store": str(tmp / "ref")}))
    a, b = _race(setup, [{**s, "t": [100], "store": str(tmp / "shared")},
                         {**s, "t": [300], "store": str(tmp / "shared")}])
    assert store_bytes(tmp / "shared") == store_bytes(tmp / "ref")
    assert record_content(tmp / "shared") == record_content(tmp / "ref")
    # captions, text and latents are shared by both entries: computed once for each image
    assert a["computed"].get("vae", 0) + b["computed"].get("vae", 0) == 9
    assert a["computed"]["unet"] == 9 and b["computed"]["unet"] == 9


def test_a_claim_of_a_killed_writer_is_taken_over_after_expiry(setup):
    from vermouth_cache.extract.request import ExtractRequest

    s, tmp = setup["base"], setup["tmp"]
    # one shard: the run has nothing else to do while the dead claim holds it, however slow the machine
    req = ExtractRequest(**{**s, "t": (100,), "store": str(tmp / "s"), "shard_size": 9})
    extract(req.with_(store=str(tmp / "ref")))
    Store(req.store, create=True)
    keys = {e.kind: e.key for e in survey(req)}
    loc = LocalLocation(Path(req.store))
    # a writer on another machine claimed shard 0 of the captions and died: its claim runs out in 10 s
    expires = time.time() + 10
    loc.create_json(Claim(f"captions/{keys['captions']}", 0, 0).key,
                    {"owner": "dead", "host": "elsewhere", "boot_id": "x", "pid": 1, "expires": expires})
    t0 = time.time()
    rep = extract(req)
    assert time.time() >= expires and rep.waited_seconds > 0 and 0 in rep.shards
    assert store_bytes(tmp / "s") == store_bytes(tmp / "ref")
    assert not list((tmp / "s").rglob("claims/*.json"))
    assert time.time() - t0 < 60


def test_a_claim_of_a_dead_process_on_this_machine_is_taken_over_at_once(setup):
    from vermouth_cache.extract.request import ExtractRequest

    s, tmp = setup["base"], setup["tmp"]
    req = ExtractRequest(**{**s, "t": (100,), "store": str(tmp / "s")})
    Store(req.store, create=True)
    keys = {e.kind: e.key for e in survey(req)}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = Claims(LocalLocation(Path(req.store)))
    me.loc.create_json(Claim(f"latents/{keys['latents']}", 0, 0).key,
                       {"owner": "dead", "host": socket.gethostname(), "boot_id": me.boot, "pid": dead.pid,
                        "expires": time.time() + 3600})
    rep = extract(req)
    assert rep.waited_seconds == 0 and 0 in rep.shards


def test_a_live_claim_is_respected_and_a_stalled_writer_loses_its_shard(tmp_path):
    loc = LocalLocation(tmp_path)
    a, b = Claims(loc, ttl=1.0), Claims(loc, ttl=1.0)
    ca = a.acquire("features/k", 0)
    assert ca is not None and b.acquire("features/k", 0) is None  # live: refused
    assert b.holder("features/k", 0)["owner"] == a.owner
    # a stalls (no renewals) past its expiry: b takes the next generation, a finds out before committing
    time.sleep(1.1)
    cb = b.acquire("features/k", 0)
    assert cb is not None and cb.generation == 1
    assert not a.held(ca) and b.held(cb)
    a.release(ca)  # a loser's release leaves the winner's files alone
    assert b.held(cb)
    b.release(cb)
    assert loc.list("features/k/claims") == []


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def test_a_dask_worker_killed_during_workers_2_extraction_changes_nothing(setup):
    from vermouth_cache.extract.request import ExtractRequest

    s, tmp = setup["base"], setup["tmp"]
    extract(ExtractRequest(**{**s, "t": (100, 300), "store": str(tmp / "ref")}))
    args = [sys.executable, "-m", "vermouth_cache.cli", "extract", s["dataset"], "--store", str(tmp / "dask"),
            "--sd-model", s["sd_model"], "--captioner", s["captioner"], "--resolution", "128", "--device", "cpu",
            "--shard-size", "1", "--stages", "mid,up", "--t", "100,300", "--workers", "2", "--quiet"]
    proc = subprocess.Popen(args, env=setup["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = list((tmp / "dask").rglob("features/*/shards/mid_block/*.json"))
        if done:  # the workers are computing: kill one of them mid-run
            workers = [p for p in _descendants(proc.pid)
                       if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()
                       and b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()]
            if len(workers) >= 2:
                killed = workers[0]
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert killed is not None, "never saw two workers computing"
    assert proc.returncode == 0, err
    assert store_bytes(tmp / "dask") == store_bytes(tmp / "ref")
    assert record_content(tmp / "dask") == record_content(tmp / "ref")
    assert "Traceback" not in err


def test_a_renewed_claim_outlives_its_ttl_and_expires_once_renewals_stop(tmp_path):
    loc = LocalLocation(tmp_path)
    holder, other = Claims(loc, ttl=0.8), Claims(loc, ttl=0.8)
    other.host = "another-machine"  # judge by expiry alone, as a writer elsewhere must
    with holder.heartbeat():
        claim = holder.acquire("features/k", 2)
        time.sleep(2.0)  # 2.5 ttl: only the renewals keep it alive
        assert other.acquire("features/k", 2) is None and holder.held(claim)
        holder.stop()  # the holder hangs
        time.sleep(1.2)
        taken = other.acquire("features/k", 2)
        assert taken is not None and not holder.held(claim)
