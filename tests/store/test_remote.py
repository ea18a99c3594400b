"""An object-store cache: a real S3-compatible server (moto's standalone server, a separate
process on loopback) holds the store; extraction, listing, verify, repair, lazy reads, read-only
opens and two writers at once all work on it, with the bytes a local store gets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import make_images, record_content, store_bytes
from vermouth_cache.extract.repair import repair
from vermouth_cache.store.check import verify
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.extract.run import extract
from vermouth_cache.store.entries import Store

MOTO = Path(sys.executable).with_name("moto_server")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    port = _free_port()
    proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in (*CREDENTIALS, "AWS_ENDPOINT_URL")}
    os.environ.update({**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint})
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.kill()
    proc.wait()


@pytest.fixture
def bucket(s3_server):
    import s3fs

    name = f"vc-{time.time_ns()}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    fs.mkdir(name)
    return name, fs


def _objects(fs, url: str) -> dict[str, bytes]:
    """Every chunk and Zarr metadata object under a store URL, by relative key."""
    root = url.split("://", 1)[1]
    return {p[len(root) + 1:]: fs.cat_file(p) for p in sorted(fs.find(root)) if "/arrays/" in p}


def _records(fs, url: str) -> dict[str, tuple]:
    root = url.split("://", 1)[1]
    out = {}
    for p in sorted(fs.find(root)):
        if "/shards/" in p:
            rec = json.loads(fs.cat_file(p))
            out[p[len(root) + 1:]] = (rec["start"], rec["stop"], tuple(rec["status"]), tuple(rec.get("values") or ()),
                                      tuple(sorted((rec.get("chunk") or {}).items())))
    return out


@pytest.fixture
def data(tmp_path):
    return make_images(tmp_path / "d", {"a": 3, "b": 2})


def test_extract_to_s3_gives_the_bytes_of_a_local_store(request_for, data, bucket, tmp_path):
    name, fs = bucket
    url = f"s3://{name}/cache"
    local = request_for(data, t=(100,), stages="mid,up", attn_maps="up")
    extract(local)
    rep = extract(local.with_(store=url))
    assert _objects(fs, url) == store_bytes(tmp_path / "store")
    assert _records(fs, url) == record_content(tmp_path / "store")
    assert not [p for p in fs.find(f"{name}/cache") if "/claims/" in p]
    # a second run finds everything and computes nothing
    again = extract(local.with_(store=url))
    assert not any(again.computed.values()) and again.entries == rep.entries


def test_a_team_member_reads_an_s3_store_read_only(request_for, data, bucket, tmp_path):
    name, fs = bucket
    url = f"s3://{name}/cache"
    rep = extract(request_for(data, t=(100,), stages="mid", store=url))
    ro = Store(url, read_only=True)
    entry = ro.find("features", rep.entries["features t=100"])
    local = Store(url).find("features", entry.key).read("mid_block")
    np.testing.assert_array_equal(entry.read("mid_block"), local)
    with pytest.raises(VermouthError, match="read-only"):
        ro.loc.write_json("x.json", {})
    with pytest.raises(VermouthError, match="read-only"):
        entry.write_shard("mid_block", 0, ["ok"] * entry.shard_bounds(0)[1], data=local[:2])
    from vermouth_cache.store.lazy import open_tap

    view = open_tap(url, f"features/{entry.key[:8]}", "mid_block")
    np.testing.assert_array_equal(view.data.compute(), local)
    assert view.sample_ids == ["a/00.png", "a/01.png", "a/02.png", "b/00.png", "b/01.png"]
    from vermouth_cache.train.loader import CacheLoader, Field

    # the stream loader's chunk reads (`Location.read_into`) on a store that has no buffer to read into
    for batch in CacheLoader({"x": Field(entry, "mid_block")}, range(5), 2, mode="stream", shuffle=True):
        np.testing.assert_array_equal(batch["x"].numpy(), local[batch["index"].numpy()].astype(np.float32))
    from click.testing import CliRunner

    from vermouth_cache.cli.main import main

    out = CliRunner().invoke(main, ["ls", url])
    assert out.exit_code == 0 and "features" in out.output and "5/5" in out.output
    assert not Store(url, read_only=True).loc.exists("features/used.json")


def test_verify_and_repair_on_s3(request_for, data, bucket):
    name, fs = bucket
    url = f"s3://{name}/cache"
    rep = extract(request_for(data, t=(100,), stages="mid", prompt="null", store=url, dtype="fp32"))
    before = _objects(fs, url)
    entry = Store(url).find("features", rep.entries["features t=100"])
    key = f"{name}/cache/{entry.chunk_key('mid_block', 1)}"
    raw = bytearray(fs.cat_file(key))
    raw[100] ^= 0xFF
    fs.pipe_file(key, bytes(raw))
    assert verify(Store(url, read_only=True), deep=False, progress=False).ok  # same size: only --deep sees it
    v = verify(Store(url, read_only=True), deep=True, progress=False)
    assert [(p.array, p.shard) for p in v.problems] == [("mid_block", 1)]
    with pytest.raises(VermouthError, match="corrupt"):
        entry.read("mid_block", [2])
    out = repair(Store(url), progress=False)
    assert out.after.ok and _objects(fs, url) == before


RACER = """
import json, os, sys, time
from vermouth_cache.extract.run import extract
from vermouth_cache.extract.request import ExtractRequest
req = ExtractRequest(**json.loads(sys.argv[1]))
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
rep = extract(req)
open(sys.argv[3], "w").write(json.dumps(rep.shards))
"""


def test_two_writers_on_one_s3_entry_equal_one_writer(request_for, data, bucket, tmp_path, tiny):
    name, fs = bucket
    url = f"s3://{name}/cache"
    req = request_for(data, t=(100,), stages="mid", shard_size=1)
    extract(req)  # the local reference
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    fields = {k: v for k, v in req.to_json().items()}
    fields.update(store=url, progress=False, t=[100])
    go = tmp_path / "go"
    env = {**os.environ, "VERMOUTH_CACHE_HOME": str(tmp_path / "home")}
    procs = [subprocess.Popen([sys.executable, str(script), json.dumps(fields), str(go), str(tmp_path / f"o{i}")],
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(2)]
    time.sleep(3)
    go.write_text("")
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    a, b = (json.loads((tmp_path / f"o{i}").read_text()) for i in range(2))
    assert not set(a) & set(b) and sorted(a + b) == list(range(5))
    assert _objects(fs, url) == store_bytes(tmp_path / "store")
    assert _records(fs, url) == record_content(tmp_path / "store")


def test_object_stores_without_atomic_create_open_read_only_only(tmp_path):
    with pytest.raises(VermouthError, match="atomic create-if-absent"):
        Store("memory://somewhere/cache", create=True)
