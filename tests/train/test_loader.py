"""CacheLoader: values, coverage, order, whole-chunk reads, refusals, threads, on tiny hand-made entries."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.train.loader import CacheLoader, Field
from vermouth_cache.store.local import LocalLocation
from vermouth_cache.store.entries import Store

N, S = 23, 4  # 6 shards, the last one short (3 samples)


def make_entry(store: Store, name: str, *, n=N, size=S, skip=(), errors=None, dtype="float16", codec="raw"):
    """Entry with arrays "a" (3, 2) and "b" (5,); shards in `skip` unwritten, `errors` {sample: reason}."""
    entry = store.entry("features", {"name": name, "n": n, "size": size}, n_samples=n, shard_size=size, about={})
    rng = np.random.default_rng(len(name))
    for array, shape in (("a", (3, 2)), ("b", (5,))):
        entry.ensure_array(array, shape, dtype, codec)
        for shard in range(entry.n_shards):
            if shard in skip:
                continue
            start, stop = entry.shard_bounds(shard)
            status = [f"error: {(errors or {}).get(i)}" if i in (errors or {}) else "ok" for i in range(start, stop)]
            entry.write_shard(array, shard, status, data=rng.standard_normal((stop - start, *shape)))
    return entry


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store", create=True)


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    """Shared, read-only: written once for the module."""
    return make_entry(Store(tmp_path_factory.mktemp("main") / "store", create=True), "main", skip={2},
                      errors={1: "bad image", 17: "oom"})


@pytest.fixture(scope="module")
def good(entry):
    """Every sample that is ok: shard 2 (8..11) was never written, samples 1 and 17 failed."""
    return [i for i in range(N) if i not in (1, 17) and not 8 <= i < 12]


def fields(entry):
    return {"a": Field(entry, "a"), "b": Field(entry, "b")}


def served(loader):
    return [b["index"].tolist() for b in loader]


@pytest.mark.parametrize("mode", ["memory", "stream"])
@pytest.mark.parametrize("batch, window", [(4, 4), (3, 2), (10, 1)])  # batches within / across windows
def test_values_equal_entry_read(entry, good, mode, batch, window):
    labels = np.arange(N) * 10
    loader = CacheLoader(fields(entry), good, batch, shuffle=True, mode=mode, shuffle_window=window,
                         extra={"label": labels})
    assert loader.mode == mode
    for batch in loader:
        idx = batch["index"].numpy()
        assert batch["index"].dtype == torch.int64
        for k in ("a", "b"):
            assert batch[k].dtype == torch.float32
            np.testing.assert_array_equal(batch[k].numpy(), entry.read(k, idx).astype(np.float32))
        np.testing.assert_array_equal(batch["label"].numpy(), labels[idx])


@pytest.mark.parametrize("mode", ["memory", "stream"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_index_once_per_epoch(entry, good, mode, drop_last):
    loader = CacheLoader(fields(entry), good, 4, shuffle=True, mode=mode, drop_last=drop_last, shuffle_window=2)
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = served(loader)
        assert len(batches) == len(loader) == (len(good) // 4 if drop_last else -(-len(good) // 4))
        flat = sum(batches, [])
        assert all(len(b) == 4 for b in batches[:-1])
        if drop_last:
            assert len(flat) == len(good) // 4 * 4 and len(set(flat)) == len(flat) and set(flat) <= set(good)
        else:
            assert sorted(flat) == good


def test_order_deterministic_per_seed_epoch_and_same_in_both_modes(entry, good):
    def order(seed, epoch, mode="stream"):
        loader = CacheLoader(fields(entry), good, 3, shuffle=True, seed=seed, mode=mode, shuffle_window=2)
        loader.set_epoch(epoch)
        return sum(served(loader), [])

    assert order(0, 0) == order(0, 0) == order(0, 0, "memory")
    assert order(0, 1) == order(0, 1, "memory")
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert order(0, 0) != sorted(good)


def test_stream_batches_do_not_depend_on_prefetch_or_read_ahead(entry, good):
    """Reader threads finish in any order; the batches (order and values) must not show it."""
    def epoch(**kw):
        loader = CacheLoader(fields(entry), good, 3, shuffle=True, seed=7, shuffle_window=2, **kw)
        loader.set_epoch(2)
        return [{k: v.numpy() for k, v in b.items()} for b in loader]

    want = epoch(mode="memory")
    for prefetch, read_ahead in ((1, 1), (1, 2), (3, 1), (2, 10)):
        got = epoch(mode="stream", prefetch=prefetch, read_ahead=read_ahead)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.keys() == w.keys() and all(np.array_equal(g[k], w[k]) for k in w)


@pytest.mark.parametrize("codec", ["raw", "zstd", "int8", "fp8"])
def test_stream_decodes_every_codec_into_reused_buffers(store, codec, monkeypatch):
    """Chunks are read into buffers reused from shard to shard: batches kept to the end of the epoch
    still hold their own values (they are copies, never views of a buffer read into again)."""
    e = make_entry(store, f"codec-{codec}", dtype="float32" if codec in ("int8", "fp8") else "float16", codec=codec)
    buffers = []
    read_into = LocalLocation.read_into

    def noting_read_into(self, key, buffer):
        buffers.append(np.asarray(buffer).base)
        return read_into(self, key, buffer)

    monkeypatch.setattr(LocalLocation, "read_into", noting_read_into)
    loader = CacheLoader({"a": Field(e, "a")}, range(N), 2, mode="stream", shuffle=True, shuffle_window=1,
                         read_ahead=1)
    batches = list(loader)
    assert len(buffers) == e.n_shards and len({id(b) for b in buffers}) < e.n_shards
    for batch in batches:
        np.testing.assert_array_equal(batch["a"].numpy(), e.read("a", batch["index"].numpy()).astype(np.float32))


@pytest.mark.parametrize("damage, why", [("flip", "checksum mismatch"), ("grow", "chunk is corrupt: .* more than"),
                                         ("delete", "chunk missing")])
def test_damage_in_a_later_shard_raises_when_its_batch_is_reached(store, damage, why):
    e = make_entry(store, "late")
    path = e.loc.path(e.chunk_key("b", 4))
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[0] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "grow":  # never read into the shard's buffer: refused from its size
        with open(path, "r+b") as f:
            f.truncate(64 << 20)
    else:
        path.unlink()
    loader = CacheLoader(fields(e), range(N), S, mode="stream", read_ahead=4)  # shard 4 is read ahead, early
    served = []
    with pytest.raises(VermouthError, match=f"store entry {e.prefix} array b shard 4: {why}"):
        for batch in loader:
            served += batch["index"].tolist()
    assert served == list(range(4 * S))  # every batch before the damaged shard's came out
    assert not loader_threads()


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_no_shuffle_is_index_order(entry, good, mode):
    loader = CacheLoader(fields(entry), list(reversed(good)), 5, mode=mode)
    assert sum(served(loader), []) == good


def test_window_shuffle_keeps_each_window_within_its_shards(entry, good):
    loader = CacheLoader(fields(entry), good, 3, shuffle=True, mode="stream", shuffle_window=2)
    flat = sum(served(loader), [])
    shards = [i // S for i in flat]
    # the shards of each window of 2 occupy one contiguous stretch of the epoch
    windows, seen = [], set()
    for s in shards:
        if s not in seen:
            seen.add(s)
            windows.append(s)
    for w in range(0, len(windows), 2):
        group = set(windows[w:w + 2])
        pos = [p for p, s in enumerate(shards) if s in group]
        assert pos == list(range(pos[0], pos[-1] + 1))


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_reads_whole_chunks_once_per_epoch(entry, good, mode, monkeypatch):
    gets = []
    read_bytes, read_into = LocalLocation.read_bytes, LocalLocation.read_into

    def counting_read(self, key, limit=None):
        if "/c/" in key:  # chunk keys, not metadata
            gets.append((key.split("/arrays/")[1], limit))
        return read_bytes(self, key, limit)

    def counting_read_into(self, key, buffer):  # stream mode reads chunks into reused buffers
        gets.append((key.split("/arrays/")[1], memoryview(buffer).nbytes))
        return read_into(self, key, buffer)

    monkeypatch.setattr(LocalLocation, "read_bytes", counting_read)
    monkeypatch.setattr(LocalLocation, "read_into", counting_read_into)
    loader = CacheLoader(fields(entry), good, 2, shuffle=True, mode=mode, shuffle_window=2)
    for epoch in range(2):
        loader.set_epoch(epoch)
        served(loader)
    touched = {i // S for i in good}  # 5 shards x 2 arrays
    per_epoch = 1 if mode == "memory" else 2  # memory mode reads once, at construction
    assert len(gets) == per_epoch * 2 * len(touched)
    assert sorted({k for k, _ in gets}) == sorted(f"{a}/c/{s}/0" + ("/0" if a == "a" else "") for a in "ab" for s in touched)
    assert all(limit == entry.chunk_nbytes(k.split("/")[0]) for k, limit in gets)  # whole chunks, size-checked


@pytest.mark.parametrize("change", ["rewritten", "failed", "removed"])
def test_memory_mode_refuses_a_shard_changed_since_it_was_loaded(store, change):
    """Memory mode reads once, at construction; a shard recomputed, re-committed as failed or removed
    since then raises at the next epoch, naming it, instead of being served from memory."""
    from vermouth_cache.store.records import ShardDamage

    entry = make_entry(store, "mem")
    loader = CacheLoader(fields(entry), list(range(N)), 4, shuffle=True, mode="memory")
    served(loader)
    start, stop = entry.shard_bounds(1)
    if change == "removed":
        entry.loc.delete(entry.record_key("b", 1))
    else:
        status = ["ok" if change == "rewritten" else "error: oom"] * (stop - start)
        entry.write_shard("b", 1, status, data=np.full((stop - start, 5), 55.0))
    loader.set_epoch(1)
    with pytest.raises(ShardDamage, match=f"{entry.prefix} array b shard 1: changed in the store since this loader"):
        served(loader)


@pytest.mark.parametrize("bad, why", [(9, "sample #9 was never computed"), (17, "sample #17 error: oom"),
                                      (1, "sample #1 error: bad image")])
def test_unavailable_indices_refused(entry, good, bad, why):
    with pytest.raises(VermouthError, match=why):
        CacheLoader(fields(entry), good + [bad], 4)


def test_refusal_names_every_field(store, good):
    e1 = make_entry(store, "one", skip={2}, errors={1: "x", 17: "x"})
    e2 = make_entry(store, "two", errors={3: "nan"})
    with pytest.raises(VermouthError, match=r"2 selected sample\(s\).*field 'x'.*#1 error: x.*field 'y'.*#3 error: nan"):
        CacheLoader({"x": Field(e1, "a"), "y": Field(e2, "a")}, [0, 1, 3], 2)


@pytest.mark.parametrize("kw, match", [
    (dict(n=N + 1), "same dataset"), (dict(size=S + 1), "same dataset")])
def test_mismatched_entries_refused(store, entry, good, kw, match):
    other = make_entry(store, "other", **kw)
    with pytest.raises(VermouthError, match=match):
        CacheLoader({"a": Field(entry, "a"), "o": Field(other, "a")}, good, 4)


def test_bad_arguments_refused(entry, good):
    with pytest.raises(VermouthError, match="no array 'zz'"):
        CacheLoader({"a": Field(entry, "zz")}, good, 4)
    with pytest.raises(VermouthError, match="duplicate"):
        CacheLoader(fields(entry), good + [0], 4)
    with pytest.raises(VermouthError, match="outside"):
        CacheLoader(fields(entry), [N], 4)
    with pytest.raises(VermouthError, match="one row per dataset sample"):
        CacheLoader(fields(entry), good, 4, extra={"label": np.zeros(N - 1)})
    with pytest.raises(VermouthError, match="clashes"):
        CacheLoader(fields(entry), good, 4, extra={"index": np.zeros(N)})
    with pytest.raises(VermouthError, match="mode"):
        CacheLoader(fields(entry), good, 4, mode="disk")


def test_auto_mode_and_nbytes(entry, good):
    loader = CacheLoader(fields(entry), good, 4)
    assert loader.nbytes == len(good) * (6 + 5) * 2  # fp16 kept as stored
    assert loader.mode == "memory"
    assert CacheLoader(fields(entry), good, 4, memory_budget_bytes=loader.nbytes - 1).mode == "stream"
    assert loader._data["a"].dtype == torch.float16


def loader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("vermouth-cache-loader") and t.is_alive()]


def test_early_break_leaves_no_thread(entry, good):
    loader = CacheLoader(fields(entry), good, 1, mode="stream", prefetch=1)
    for i, _ in enumerate(loader):
        assert loader_threads()
        if i == 2:
            break
    assert not loader_threads()
    it = iter(loader)
    next(it)
    it.close()
    assert not loader_threads()
    assert len(served(loader)) == len(good)  # and a fresh epoch still works


def test_worker_error_reraised_in_main_thread(entry, good, monkeypatch):
    def broken(self, name, shard, rows, into=None):
        raise OSError("disk gone")

    loader = CacheLoader(fields(entry), good, 4, mode="stream")
    monkeypatch.setattr(type(entry), "read_block", broken)
    with pytest.raises(OSError, match="disk gone"):
        served(loader)
    assert not loader_threads()


def test_progress_bar_exposed_during_iteration(entry, good):
    loader = CacheLoader(fields(entry), good, 4, mode="stream", progress="train")
    assert loader.bar is None
    for _ in loader:
        assert loader.bar is not None and loader.bar.desc.startswith("train")
        loader.bar.set_postfix(loss=0.5)
    assert loader.bar is None


def test_bfloat16_and_float32_entries(store):
    for dtype in ("bfloat16", "float32"):
        e = make_entry(store, f"d-{dtype}", dtype=dtype)
        for mode in ("memory", "stream"):
            for batch in CacheLoader({"a": Field(e, "a")}, range(N), 5, mode=mode, shuffle=True):
                assert batch["a"].dtype == torch.float32
                np.testing.assert_array_equal(batch["a"].numpy(), e.read("a", batch["index"].numpy()))
