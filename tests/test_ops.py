"""Operations: files a team can read (the umask, not mkstemp's 0600, decides their mode) and logs
that stay small and readable when piped to a file (progress bars only on a terminal, --quiet,
--verbose)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from test_sweep_report import grid
from vermouth_cache.atomic import atomic_create, atomic_write, atomic_write_json
from vermouth_cache.export import export_h5
from vermouth_cache.extract import extract
from vermouth_cache.request import ExtractRequest
from vermouth_cache.store import Store
from vermouth_cache.sweep.report import write_report
from vermouth_cache.synthetic import make_classification
from vermouth_cache.train.common import RunOptions
from vermouth_cache.train.fewshot import FewshotData, train_fewshot
from vermouth_cache.train.settings import task_settings


def modes(root: Path) -> dict[str, int]:
    """Permission bits of every file below `root`, by relative path."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def umask():
    saved = os.umask(0o022)
    os.umask(saved)

    def set_to(value: int) -> None:
        os.umask(value)

    yield set_to
    os.umask(saved)


# ---- 11: files for a team -------------------------------------------------------------------------

@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600)])
def test_every_file_written_honours_the_umask(umask, tiny, tmp_path, mask, expected):
    umask(mask)
    split = make_classification(tmp_path / "cls", n_classes=2, per_class=(3, 1, 1), size=64)
    store = tmp_path / "store"
    base = ExtractRequest(dataset=str(split), store=str(store), sd_model=str(tiny["sd"]), captioner=str(tiny["blip"]),
                          resolution=64, t=(10,), stages="mid,up", device="cpu", shard_size=4, progress=False)
    for part in ("train", "val", "test"):
        rep = extract(base.with_(split=part))
    export_h5(Store(store), tmp_path / "export" / "feats.h5", entry_key=rep.entries["features t=10"])
    s = task_settings("fewshot", t=10, resolution=64, stages="mid,up", attn_maps="none", expert="none", epochs=2,
                      batch_size=4)
    train_fewshot(FewshotData(str(split), shots=3), s, RunOptions(store=str(store), out=str(tmp_path / "run"),
                                                         clip_model=str(tiny["clip"]), device="cpu", progress=False))
    write_report(grid(), tmp_path / "report", title="grid")
    for folder, must in (("store", {"vermouth-store.json"}), ("export", {"feats.h5"}),
                         ("run", {"config.json", "metrics.json", "head.safetensors", "curve.png"}),
                         ("report", {"results.csv"})):
        found = modes(tmp_path / folder)
        assert must <= {Path(k).name for k in found}, (folder, sorted(found))
        # the store's JSON, Zarr metadata and chunks, shard records; the run; the export; the report
        wrong = {k: oct(v) for k, v in found.items() if v != expected}
        assert not wrong, (folder, oct(expected), wrong)
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_atomic_helpers_keep_the_old_file_on_failure_and_create_only_once(umask, tmp_path):
    umask(0o027)
    target = tmp_path / "a" / "x.json"
    atomic_write_json(target, {"v": 1})
    assert stat.S_IMODE(target.stat().st_mode) == 0o640 and target.read_text() == '{\n "v": 1\n}'

    def failing(path):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, write=failing)
    assert target.read_text() == '{\n "v": 1\n}' and sorted(p.name for p in target.parent.iterdir()) == ["x.json"]
    assert atomic_create(tmp_path / "a" / "c", b"1") and not atomic_create(tmp_path / "a" / "c", b"2")
    assert (tmp_path / "a" / "c").read_bytes() == b"1"
    assert sorted(p.name for p in target.parent.iterdir()) == ["c", "x.json"]
