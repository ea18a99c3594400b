"""Hostile inputs (issue 11): each gets one `error: ...` line naming the culprit and exit 1, or, for
a bad image under `--on-error skip`, a per-sample error status; never a traceback, never a
runaway allocation."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import DEMO_SPLIT, cli, make_images
from vermouth_cache.data.datasets import load_dataset
from vermouth_cache.core.errors import ImageError, VermouthError
from vermouth_cache.data.images import decode_image


def one_line(code: int, err: str, *culprits: str) -> str:
    assert code == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for c in culprits:
        assert c in lines[0], (c, lines[0])
    assert len(lines[0]) < 1000  # a 5000-character name is shortened, not dumped
    return lines[0]


@pytest.fixture
def models_args(tiny, tmp_path):
    return ["--store", tmp_path / "store", "--sd-model", tiny["sd"], "--captioner", tiny["blip"],
            "--resolution", "128", "--device", "cpu", "--quiet", "--shard-size", "2", "--stages", "mid"]


@pytest.fixture
def no_huge_resize(monkeypatch):
    """Make a runaway resize fail at once instead of allocating gigabytes (as the old code did)."""
    original = Image.Image.resize

    def guarded(self, size, *a, **k):
        assert size[0] * size[1] <= 4_000_000, f"resize to {size} would allocate {size[0] * size[1] * 3 / 1e9:.1f} GB"
        return original(self, size, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", guarded)


def write_strip(path, size=(1, 400_000)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, 128).save(path)
    return path


# ---------------------------------------------------------------- 1. elongated images


def test_elongated_image_refused_before_decoding(tmp_path, no_huge_resize):
    strip = write_strip(tmp_path / "strip.png")
    assert strip.stat().st_size < 2000  # tiny on disk, under MAX_PIXELS
    with pytest.raises(ImageError, match=r"1x400000 exceeds the aspect ratio 50:1"):
        decode_image(strip, "strip.png")
    with pytest.raises(ImageError, match="elongated"):
        decode_image(write_strip(tmp_path / "wide.png", (201, 4)), "wide.png")
    ok = decode_image(write_strip(tmp_path / "edge.png", (200, 4)), "edge.png")  # exactly 50:1 passes
    assert ok.size == (200, 4) and ok.mode == "RGB"


def test_elongated_image_fails_in_one_line(monkeypatch, capsys, tmp_path, models_args, no_huge_resize):
    root = make_images(tmp_path / "imgs", {"cat": 1, "dog": 1})
    write_strip(root / "cat" / "strip.png")
    code, _, err = cli(monkeypatch, capsys, "extract", root, *models_args)
    one_line(code, err, "cat/strip.png", "1x400000", "aspect ratio 50:1")


def test_elongated_image_skipped_gets_a_status(request_for, tmp_path, no_huge_resize):
    from vermouth_cache.extract.run import extract
    from vermouth_cache.store.entries import Store

    root = make_images(tmp_path / "imgs", {"cat": 1, "dog": 1})
    write_strip(root / "cat" / "strip.png")
    rep = extract(request_for(root, on_error="skip", stages="mid", t=(200,)))
    assert set(rep.failed) == {"cat/strip.png"} and "aspect ratio" in rep.failed["cat/strip.png"]
    entry = Store(tmp_path / "store").find("features", rep.entries["features t=200"])
    assert entry.statuses("mid_block") == ["ok", "error: image too elongated: 1x400000 exceeds the aspect ratio 50:1",
                                           "ok"]


# ---------------------------------------------------------------- 2. labels beyond the class list


def write_coop(path, data) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_huge_coop_label_is_one_line(monkeypatch, capsys, tmp_path, models_args):
    root = make_images(tmp_path / "data" / "images", {"a": 1, "b": 1})
    spec = write_coop(tmp_path / "data" / "split_zhou_X.json", {
        "train": [["a/00.png", 0, "a"], ["b/00.png", 10**11, "b"]], "test": [["a/00.png", 0, "a"]]})
    code, _, err = cli(monkeypatch, capsys, "extract", spec, "--split", "train", "--image-root", root, *models_args)
    one_line(code, err, spec, "train[1]", "label 100000000000", "0-1")
    # a gap in a named class list is out of range too: names for labels 0 and 2, none for 1
    spec = write_coop(tmp_path / "data" / "split_zhou_Y.json", {
        "train": [["a/00.png", 0, "a"]], "test": [["b/00.png", 2, "b"]]})
    with pytest.raises(VermouthError, match=r"test\[0\]: label 2 is out of range \(the file names 2 classes"):
        load_dataset(spec, split="train", image_root=root)


def test_huge_manifest_label_is_one_line(monkeypatch, capsys, tmp_path, models_args):
    make_images(tmp_path / "data", {"a": 2})
    spec = tmp_path / "data" / "m.csv"
    spec.write_text(f"path,label\na/00.png,0\na/01.png,{10**11}\n")
    code, _, err = cli(monkeypatch, capsys, "extract", spec, *models_args)
    one_line(code, err, f"{spec}: line 3", "label 100000000000", "100000")
    spec.write_text("path,label\na/00.png,0\na/01.png," + "9" * 5000 + "\n")  # int() refuses > 4300 digits
    code, _, err = cli(monkeypatch, capsys, "extract", spec, *models_args)
    one_line(code, err, f"{spec}: line 3", "out of range")


# ---------------------------------------------------------------- 3. names longer than the OS allows


def test_overlong_path_component_is_one_line(monkeypatch, capsys, tmp_path, models_args):
    make_images(tmp_path / "data" / "images", {"a": 1})
    long = "x" * 5000 + ".png"
    spec = write_coop(tmp_path / "data" / "split_zhou_X.json", {"train": [["a/00.png", 0, "a"], [f"a/{long}", 0, "a"]]})
    code, _, err = cli(monkeypatch, capsys, "extract", spec, "--split", "train", *models_args)
    one_line(code, err, spec, "train[1]", "a/xxxx", "File name too long (a component of 5004 bytes)")
    manifest = tmp_path / "data" / "m.jsonl"
    manifest.write_text(json.dumps({"path": f"images/a/{long}"}) + "\n")
    code, _, err = cli(monkeypatch, capsys, "extract", manifest, *models_args)
    one_line(code, err, f"{manifest}: line 1", "images/a/xxx", "a component of 5004 bytes")
    # and as the DATASET argument itself
    code, _, err = cli(monkeypatch, capsys, "extract", tmp_path / long, *models_args)
    one_line(code, err, "dataset /", "File name too long (a component of 5004 bytes)")


# ---------------------------------------------------------------- 4. JSON nested too deeply


def test_deeply_nested_split_file_is_one_line(monkeypatch, capsys, tmp_path, models_args):
    deep = "[" * 100_000 + "]" * 100_000
    spec = write_coop(tmp_path / "split_zhou_Deep.json", '{"train": ' + deep + "}")
    code, _, err = cli(monkeypatch, capsys, "extract", spec, "--split", "train", *models_args)
    one_line(code, err, spec, "nested too deeply")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "a.png"}\n{"path": ' + deep + "}\n")
    code, _, err = cli(monkeypatch, capsys, "extract", manifest, *models_args)
    one_line(code, err, f"{manifest}: line 2", "nested too deeply")


# ---------------------------------------------------------------- 5. export's output


@pytest.fixture
def small_store(request_for, tmp_path):
    from vermouth_cache.extract.run import extract

    root = make_images(tmp_path / "imgs", {"a": 2}, size=(64, 64))
    req = request_for(root, stages="mid", t=(200,))
    extract(req)
    return req.store


def test_export_to_a_missing_directory_or_a_directory(monkeypatch, capsys, tmp_path, small_store):
    code, _, err = cli(monkeypatch, capsys, "export", small_store, "--out", tmp_path / "missing" / "dir" / "x.h5")
    one_line(code, err, str(tmp_path / "missing" / "dir"), "does not exist")
    code, _, err = cli(monkeypatch, capsys, "export", small_store, "--out", tmp_path)
    one_line(code, err, str(tmp_path), "is a directory")
    (tmp_path / "afile").write_text("x")
    code, _, err = cli(monkeypatch, capsys, "export", small_store, "--out", tmp_path / "afile" / "x.h5")
    one_line(code, err, str(tmp_path / "afile"), "is not a directory")


def test_export_onto_a_full_disk_leaves_nothing(monkeypatch, capsys, tmp_path, small_store):
    import h5py

    out = tmp_path / "out" / "feats.h5"
    out.parent.mkdir()
    original = h5py.Group.create_dataset
    seen = []

    def full(self, name, *a, **k):  # the file and its first datasets exist, then the disk is full
        seen.append(name)
        if len(seen) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, name, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", full)
    code, _, err = cli(monkeypatch, capsys, "export", small_store, "--out", out)
    one_line(code, err, str(out), "No space left on device")
    assert len(seen) == 4  # it failed while writing, with a partial temporary file on disk
    assert list(out.parent.iterdir()) == []  # no temporary file, nothing under --out
    monkeypatch.undo()
    code, stdout, _ = cli(monkeypatch, capsys, "export", small_store, "--out", out)  # space is back
    assert code == 0 and out.is_file() and list(out.parent.iterdir()) == [out]


# ---------------------------------------------------------------- 6. train options


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_train_memory_gb_must_be_finite(monkeypatch, capsys, tmp_path, value):
    code, _, err = cli(monkeypatch, capsys, "train", "fewshot", "--store", tmp_path / "store", "--dataset", DEMO_SPLIT,
                       "--out", tmp_path / "run", "--memory-gb", value)
    one_line(code, err, "--memory-gb", value)
    assert not (tmp_path / "run").exists()


def test_train_out_that_is_a_file(monkeypatch, capsys, tmp_path):
    (tmp_path / "run").write_text("not a directory")
    code, _, err = cli(monkeypatch, capsys, "train", "fewshot", "--store", tmp_path / "store", "--dataset", DEMO_SPLIT,
                       "--out", tmp_path / "run")
    one_line(code, err, f"run directory {tmp_path / 'run'} is not a directory")
    code, _, err = cli(monkeypatch, capsys, "train", "sbir", "--store", tmp_path / "store", "--dataset", tmp_path,
                       "--out", tmp_path / "run" / "sub")
    one_line(code, err, f"is inside {tmp_path / 'run'}, which is not a directory")
    assert (tmp_path / "run").read_text() == "not a directory"


# ---------------------------------------------------------------- 7. symbolic links


def test_symlinks_out_of_the_root_are_refused_when_listing(monkeypatch, capsys, tmp_path, models_args):
    root = make_images(tmp_path / "imgs", {"cat": 2, "dog": 1})
    outside = make_images(tmp_path / "outside", {"x": 1})
    (root / "cat" / "evil.png").symlink_to("/etc/passwd")
    for on_error in ("fail", "skip"):  # a dataset that reads files it does not hold is refused either way
        code, _, err = cli(monkeypatch, capsys, "extract", root, *models_args, "--on-error", on_error)
        one_line(code, err, "cat/evil.png", "leading outside the image root", "/etc/passwd")
    (root / "cat" / "evil.png").unlink()
    (root / "cat" / "stolen.png").symlink_to(outside / "x" / "00.png")
    code, _, err = cli(monkeypatch, capsys, "extract", root, *models_args)
    one_line(code, err, "cat/stolen.png", "outside the image root")
    (root / "cat" / "stolen.png").unlink()
    (root / "linked").symlink_to(outside / "x")  # a whole class directory from elsewhere
    with pytest.raises(VermouthError, match="class directory .*linked is a symbolic link leading outside"):
        load_dataset(root)
    (root / "linked").unlink()
    (root / "cat" / "alias.png").symlink_to(root / "dog" / "00.png")  # inside the root: fine
    assert [s.id for s in load_dataset(root).samples] == ["cat/00.png", "cat/01.png", "cat/alias.png", "dog/00.png"]


def test_broken_symlinks_are_named_not_dropped(monkeypatch, capsys, tmp_path, models_args):
    root = make_images(tmp_path / "imgs", {"cat": 1, "dog": 1})
    (root / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    code, _, err = cli(monkeypatch, capsys, "extract", root, *models_args, "--on-error", "skip")
    one_line(code, err, "cat/gone.png", "broken symbolic link")
    (root / "cat" / "gone.png").unlink()
    (root / "bird").symlink_to(tmp_path / "no-such-dir")
    with pytest.raises(VermouthError, match="bird is a broken symbolic link"):
        load_dataset(root)


def test_symlinks_in_split_files_and_manifests(monkeypatch, capsys, tmp_path, models_args):
    base = tmp_path / "data"
    make_images(base / "images", {"a": 1})
    outside = make_images(tmp_path / "outside", {"x": 1})
    (base / "images" / "a" / "evil.png").symlink_to(outside / "x" / "00.png")
    spec = write_coop(base / "split_zhou_X.json", {"train": [["a/00.png", 0, "a"], ["a/evil.png", 0, "a"]]})
    code, _, err = cli(monkeypatch, capsys, "extract", spec, "--split", "train", *models_args)
    one_line(code, err, f"{spec}: train[1]", "a/evil.png", "outside the image root")
    # a linked directory on the way out of the root
    (base / "images" / "far").symlink_to(outside / "x")
    manifest = base / "images" / "m.csv"
    manifest.write_text("path,label\na/00.png,0\nfar/00.png,0\n")
    code, _, err = cli(monkeypatch, capsys, "extract", manifest, *models_args)
    one_line(code, err, f"{manifest}: line 3", "far/00.png", "outside the image root")
    (base / "images" / "a" / "dead.png").symlink_to(tmp_path / "nowhere.png")
    manifest.write_text("path,label\na/00.png,0\na/dead.png,0\n")
    code, _, err = cli(monkeypatch, capsys, "extract", manifest, *models_args)
    one_line(code, err, f"{manifest}: line 3", "a/dead.png", "broken symbolic link")


def test_symlinks_in_segmentation_roots(tmp_path):
    root = tmp_path / "seg"
    make_images(root / "images", {"train": 2}, size=(8, 8))
    (root / "masks" / "train").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / "train" / f"{i:02d}.png")
    (root / "classnames.txt").write_text("a\nb\n")
    assert len(load_dataset(root, layout="generic", split="train")) == 2
    (root / "masks" / "train" / "01.png").unlink()
    (root / "masks" / "train" / "01.png").symlink_to("/etc/passwd")
    with pytest.raises(VermouthError, match="mask .*01.png is a symbolic link leading outside"):
        load_dataset(root, layout="generic", split="train")
    (root / "masks" / "train" / "01.png").unlink()
    (root / "masks" / "train" / "01.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(VermouthError, match="mask .*01.png is a broken symbolic link"):
        load_dataset(root, layout="generic", split="train")


def test_ctrl_c_is_one_line_that_says_how_to_resume(request_for, folder, tmp_path, monkeypatch, capsys):
    """Ctrl-C during a command: one line, exit 130 (click's own handling printed a blank line first
    and lost the hint)."""
    from conftest import cli
    from vermouth_cache.extract import run as extract_run

    def interrupted(req, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_run, "extract", interrupted)
    req = request_for(folder)
    code, _, err = cli(monkeypatch, capsys, "extract", folder, "--store", tmp_path / "s", "--sd-model", req.sd_model,
                       "--captioner", req.captioner, "--quiet")
    assert code == 130 and err == "interrupted: run the same command again to resume\n"
