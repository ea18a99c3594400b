"""Regression tests for bugs found by the second round of hostile testing (branch `breaker2`). Each
fails on the commit it was written against; see the docstrings for the reproduction."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import cli, make_images
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.extract.run import extract
from vermouth_cache.store.lazy import open_tap
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.store.entries import Store

TAP = "mid_block"


@pytest.fixture(scope="module")
def pristine(tiny, tmp_path_factory):
    """5 ids, shards of 2, every sample ok."""
    base = tmp_path_factory.mktemp("breaker2")
    imgs = make_images(base / "imgs", {"cat": 3, "dog": 2})
    req = ExtractRequest(dataset=str(imgs), store=str(base / "store"), sd_model=str(tiny["sd"]),
                         captioner=str(tiny["blip"]), resolution=64, device="cpu", shard_size=2, batch_size=2,
                         progress=False, taps=TAP, prompt="null", dtype="fp32")
    rep = extract(req)
    feats = Store(req.store).find("features", rep.entries["features t=200"])
    return {"root": Path(req.store), "key": feats.key, "captions": feats.manifest["about"]["captions"]}


@pytest.fixture
def copy(pristine, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(pristine["root"], root)
    return root, Store(root).find("features", pristine["key"])


def _drop_caption_shard0(root: Path, pristine) -> None:
    caps = Store(root).find("captions", pristine["captions"])
    caps.loc.path(caps.record_key("captions", 0)).unlink()


@pytest.mark.parametrize("ref", ["/884", "../884246f047e5c9a3", "/0123456789abcdef"])
def test_gc_entry_with_an_empty_or_dotdot_kind_is_one_error_line(copy, monkeypatch, capsys, ref):
    """`vermouth-cache gc STORE --dry-run --entry /884` (or `--entry ../<key>`): found a Python
    traceback, `ValueError: bad store key '/884/manifest.json'` from storage._check_key, because the
    kind part of --entry is never checked (only the key part is). Should be one `error:` line naming
    the bad --entry, exit non-zero."""
    root, _ = copy
    rc, out, err = cli(monkeypatch, capsys, "gc", root, "--dry-run", "--entry", ref)
    assert rc != 0
    assert err.strip().startswith("error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_export_with_a_caption_shard_never_committed_is_one_error_line(copy, pristine, monkeypatch, capsys, tmp_path):
    """Delete captions/<key>/shards/captions/000000.json (the caption shard is gone: never computed),
    then `vermouth-cache export STORE --out x.h5`. Found: a traceback from h5py, `TypeError: Can't
    implicitly convert non-string objects to strings` (Entry.values returns None for the samples of
    a shard without a record and export writes them). Should be one `error:` line naming the
    captions entry and the samples not computed, exit non-zero, and no file written."""
    root, feats = copy
    _drop_caption_shard0(root, pristine)
    out_h5 = tmp_path / "x.h5"
    rc, out, err = cli(monkeypatch, capsys, "export", root, "--entry", feats.key, "--out", out_h5)
    assert rc != 0
    assert err.strip().startswith("error:") and "Traceback" not in err
    assert not out_h5.exists()


def test_lazy_view_never_serves_none_for_a_caption_never_computed(copy, pristine):
    """Same damage as above, then `open_tap(store, key, "mid_block")`. Found: the view serves
    captions `[None, None, '', '', '']`: the two samples of the missing caption shard read as None
    (not computed) while their features are served as ok. Should raise, naming the captions entry
    and the shard (as Entry.read does for an array), or leave those samples out as skipped."""
    root, feats = copy
    _drop_caption_shard0(root, pristine)
    try:
        view = open_tap(str(root), feats.key, TAP)
    except VermouthError as exc:
        assert "captions" in str(exc)
        return
    assert view.captions is None or None not in view.captions


@pytest.mark.parametrize("ref", ["../884246f047e5c9a3", "/884"])
def test_lazy_open_tap_with_a_dotdot_or_empty_kind_raises_vermouth_error(copy, ref):
    """`open_tap(store, "../<key>", "mid_block")` or `open_tap(store, "/884", ...)`: found a bare
    `ValueError: bad store key '../<key>/manifest.json'` (storage._check_key), the same unchecked
    kind as `gc --entry`. Should be a VermouthError naming the bad entry reference."""
    root, _ = copy
    with pytest.raises(VermouthError):
        open_tap(str(root), ref, TAP)
