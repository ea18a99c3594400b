"""What a team can trust in a store: keys (every recipe field changes one; paths, workers and
batching do not), bad images each get a status and --max-error-rate decides, no pickles anywhere,
lazy dask views that refuse what was not computed, requests the store lacks refused with the
fields that differ, and gc that shows before it deletes."""

from __future__ import annotations

import json
import os
import pickle
import sys
import time

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import make_images
from vermouth_cache.cli.main import main
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.extract.run import extract
from vermouth_cache.store.entries import Store
from vermouth_cache.extract.survey import survey

# ---------------------------------------------------------------- keys


def _keys(req) -> dict[str, str]:
    return {e.kind + (f" t={e.about['t']}" if e.kind == "features" else ""): e.key for e in survey(req)}


# field -> (a different value, the entries it must change)
RECIPE_FIELDS = {
    "t": ((300,), {"features t=300"}),
    "resolution": (192, {"latents", "features", "expert"}),
    "prompt": ("null", {"captions", "text", "features"}),
    "caption_prefix": ("a picture of ", {"captions", "text", "features"}),
    "caption_min_tokens": (3, {"captions", "text", "features"}),
    "caption_max_tokens": (12, {"captions", "text", "features"}),
    "text_layer": ("penultimate", {"text", "features"}),
    "noise": ("none", {"features"}),
    "seed": (5, {"features"}),
    "noise_draws": (2, {"features"}),
    "dtype": ("fp32", {"features", "expert"}),
    "expert_model": (None, {"expert"}),  # filled in the test: another expert's weights
    "shots": (1, {"captions", "text", "latents", "features", "expert"}),
}


@pytest.mark.parametrize("field", sorted(RECIPE_FIELDS))
def test_every_recipe_field_changes_a_key(request_for, folder, tiny, tmp_path, field):
    base = request_for(folder, t=(200,), expert="resnet18", expert_model=str(tiny["resnet18"]))
    value, changed = RECIPE_FIELDS[field]
    if field == "expert_model":
        from vermouth_cache.models.tiny import write_tiny_models

        value = str(write_tiny_models(tmp_path / "other", seed=1)["resnet18"])
    before, after = _keys(base), _keys(base.with_(**{field: value}))
    kinds = lambda ks: {k.split(" ")[0] for k in ks}  # noqa: E731
    differs = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert kinds(differs) == kinds(changed), (field, differs)


def test_inversion_steps_change_the_inverted_features(request_for, folder):
    base = request_for(folder, noise="ddim-inversion")
    assert _keys(base)["features t=200"] != _keys(base.with_(inversion_steps=4))["features t=200"]


def test_paths_workers_batching_and_threads_change_no_key(request_for, folder, tmp_path):
    import shutil

    base = request_for(folder, t=(200,))
    moved = shutil.copytree(folder, tmp_path / "moved")
    same = [base.with_(store=str(tmp_path / "other-store")), base.with_(workers=4), base.with_(batch_size=1),
            base.with_(shard_size=7), base.with_(device=None), base.with_(cpu_threads=1),
            base.with_(scheduler="tcp://nowhere:8786"), base.with_(dataset=str(moved)), base.with_(progress=True)]
    ref = _keys(base)
    for req in same:
        assert _keys(req) == ref


def test_same_file_name_with_other_bytes_is_a_new_dataset(request_for, folder):
    before = _keys(request_for(folder))
    (folder / "cat" / "00.png").write_bytes((folder / "dog" / "01.png").read_bytes())
    after = _keys(request_for(folder))
    assert all(before[k] != after[k] for k in before)


# ---------------------------------------------------------------- images


def _bad_images(root):
    """One of each: fine, truncated, empty, wrong extension, CMYK, 16-bit, alpha, very large."""
    make_images(root, {"x": 2})
    good = root / "x" / "00.png"
    rgb = np.asarray(Image.open(good))
    d = root / "y"
    d.mkdir()
    Image.fromarray(rgb).save(d / "full.jpg", quality=95)
    (d / "truncated.jpg").write_bytes((d / "full.jpg").read_bytes()[:300])
    (d / "empty.png").write_bytes(b"")
    Image.fromarray(rgb).save(d / "really_a_png.jpg", format="PNG")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(d / "sixteen.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(d / "alpha.png")
    Image.new("1", (11000, 10000)).save(d / "huge.png")  # 110 Mpx, a few KB on disk
    return {"y/truncated.jpg": "truncated", "y/empty.png": "empty", "y/huge.png": "too large"}


def test_every_bad_image_gets_a_status_and_none_is_padded(request_for, tmp_path):
    bad = _bad_images(tmp_path / "imgs")
    req = request_for(tmp_path / "imgs", on_error="skip", prompt="blip", stages="mid")
    rep = extract(req)
    assert set(rep.failed) == set(bad)
    store = Store(req.store)
    record = store.dataset(rep.dataset["record"])
    feats = store.find("features", rep.entries["features t=200"])
    for entry in (store.find("captions", rep.entries["captions"]), store.find("latents", rep.entries["latents"]), feats):
        name = entry.record_names()[0]
        st = dict(zip(record["ids"], entry.statuses(name)))
        for sid, why in bad.items():
            assert st[sid].startswith("error:") and why in st[sid], (entry.prefix, sid, st[sid])
        assert all(v == "ok" for k, v in st.items() if k not in bad)
        if entry is feats:
            for sid in bad:
                with pytest.raises(VermouthError, match="not available"):
                    entry.read(name, [record["ids"].index(sid)])


@pytest.mark.parametrize("rate, ok", [(0.2, False), (0.5, True)])
def test_max_error_rate_decides_failure(request_for, tmp_path, rate, ok, capsys, monkeypatch):
    _bad_images(tmp_path / "imgs")  # 3 of 10 images are bad
    req = request_for(tmp_path / "imgs", prompt="null", stages="mid")
    args = ["extract", str(tmp_path / "imgs"), "--store", req.store, "--sd-model", req.sd_model, "--captioner",
            req.captioner, "--resolution", "128", "--device", "cpu", "--stages", "mid", "--prompt", "null",
            "--max-error-rate", str(rate), "--quiet"]
    from vermouth_cache.cli.main import run

    monkeypatch.setattr(sys, "argv", ["vermouth-cache", *args])
    if ok:
        run()
        assert "3 sample(s) failed" in capsys.readouterr().err
    else:
        with pytest.raises(SystemExit) as e:
            run()
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert "3 of 10 images" in err and "30.0% > --max-error-rate 20.0%" in err and "y/empty.png" in err
    # either way the good images are all extracted and the store is clean
    from vermouth_cache.store.check import verify

    v = verify(Store(req.store), progress=False)
    assert v.ok and not v.incomplete and len(next(iter(v.failed_samples.values()))) == 3


# ---------------------------------------------------------------- no pickles


def test_stores_runs_and_exports_hold_no_pickles(request_for, folder, tmp_path):
    req = request_for(folder, stages="mid", attn_maps="up")
    rep = extract(req)
    out = tmp_path / "f.h5"
    CliRunner().invoke(main, ["export", req.store, "--out", str(out)], catch_exceptions=False)
    for p in (tmp_path / "store").rglob("*"):
        if not p.is_file():
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:  # a chunk: raw numbers under arrays/<name>/c/
            assert "/arrays/" in str(p) and "/c/" in str(p), p
            assert not p.read_bytes().startswith(b"\x80\x04\x95"), p
    with h5py.File(out) as f:
        def no_objects(name, obj):
            if isinstance(obj, h5py.Dataset):
                assert obj.dtype.kind != "O" or h5py.check_string_dtype(obj.dtype) is not None, name
        f.visititems(no_objects)
    assert rep.entries


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/vermouth-pickle-ran",))


def test_loading_refuses_pickles(request_for, folder, tmp_path, tiny):
    import shutil

    marker = "/tmp/vermouth-pickle-ran"
    if os.path.exists(marker):
        os.unlink(marker)
    # a store array declaring a pickle codec is refused before a byte is decoded
    req = request_for(folder, stages="mid", prompt="null")
    rep = extract(req)
    entry = Store(req.store).find("features", rep.entries["features t=200"])
    meta_path = entry.loc.path(f"{entry.prefix}/arrays/mid_block/zarr.json")
    meta = json.loads(meta_path.read_text())
    meta["codecs"].insert(0, {"name": "numcodecs.pickle", "configuration": {"protocol": 5}})
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(VermouthError, match="numcodecs.pickle.*never decodes pickles"):
        Store(req.store).find("features", entry.key).read("mid_block", [0])
    meta["codecs"].pop(0)
    meta["data_type"] = "object"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(VermouthError, match="may hold Python objects"):
        Store(req.store).find("features", entry.key).read("mid_block", [0])
    # a model directory with only pickled weights is refused
    vae = tmp_path / "sd-pickled"
    shutil.copytree(tiny["sd"], vae)
    weights = next((vae / "vae").glob("*.safetensors"))
    weights.unlink()
    (vae / "vae" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(VermouthError, match="only pickled weights"):
        extract(request_for(folder, sd_model=str(vae), store=str(tmp_path / "s2"), prompt="null"))
    # a head checkpoint that is a pickle in disguise is refused, and never runs
    from vermouth_cache.train.runs import load_head

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "head.safetensors").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(Exception):
        load_head(run)
    assert not os.path.exists(marker)


# ---------------------------------------------------------------- lazy access


def test_lazy_tap_views_match_reads_and_refuse_what_is_missing(request_for, tmp_path):
    bad = _bad_images(tmp_path / "imgs")
    req = request_for(tmp_path / "imgs", on_error="skip", stages="mid,up", shard_size=3)
    rep = extract(req)
    from vermouth_cache.store.lazy import open_tap

    key = rep.entries["features t=200"]
    view = open_tap(req.store, key[:6], "up_blocks.1")
    entry = Store(req.store).find("features", key)
    assert view.data.shape[0] == 7 and view.data.chunks[0] == (3, 2, 2)  # one block per shard, bad rows left out
    np.testing.assert_array_equal(view.data.compute(), entry.read("up_blocks.1", view.rows))
    assert set(view.skipped) == set(bad) and not set(view.sample_ids) & set(bad)
    assert view.labels.tolist() == [0, 0, 1, 1, 1, 1, 1] and len(view.captions) == 7 and all(view.captions)
    mean = view.data.astype("float64").mean(axis=(0, 2, 3)).compute()  # a statistic, shard by shard
    np.testing.assert_allclose(mean, entry.read("up_blocks.1", view.rows).astype("float64").mean(axis=(0, 2, 3)),
                               rtol=1e-10)
    with pytest.raises(VermouthError, match="3 of 10 samples are not available"):
        open_tap(req.store, key, "up_blocks.1", samples="all")
    # a block whose shard lost its record after the view was made raises when computed
    entry.loc.delete(entry.record_key("up_blocks.1", 0))
    with pytest.raises(VermouthError, match="never computed"):
        view.data.compute()
    lat = open_tap(req.store, f"latents/{rep.entries['latents']}", "latent")
    assert lat.data.shape == (7, 4, 16, 16) and lat.captions is None


# ---------------------------------------------------------------- requests the store lacks


def test_export_of_a_recipe_the_store_lacks_names_the_fields(request_for, folder, tmp_path):
    req = request_for(folder, t=(200,), stages="mid", resolution=128)
    extract(req)
    r = CliRunner().invoke(main, ["export", req.store, "--out", str(tmp_path / "x.h5"), "--dataset", str(folder),
                                  "--t", "300", "--resolution", "128", "--noise", "none"])
    assert r.exit_code != 0
    assert "t (cached 200, requested 300)" in str(r.exception) and "noise (cached ddpm, requested none)" in str(r.exception)
    ok = CliRunner().invoke(main, ["export", req.store, "--out", str(tmp_path / "x.h5"), "--dataset", str(folder),
                                   "--t", "200", "--resolution", "128"])
    assert ok.exit_code == 0, ok.output
    assert not (tmp_path / "y.h5").exists()


# ---------------------------------------------------------------- gc


def test_gc_lists_then_asks_then_deletes(request_for, folder):
    req = request_for(folder, t=(100, 200), stages="mid", prompt="null")
    rep = extract(req)
    store = Store(req.store)
    old = store.find("features", rep.entries["features t=100"])
    old.loc.write_json(f"{old.prefix}/used.json", {"last_used": time.time() - 40 * 86400})
    for e in store.entries():  # everything else was made a minute ago
        assert e.prefix == old.prefix or e.last_used() > time.time() - 600
    runner = CliRunner()
    listed = runner.invoke(main, ["gc", req.store, "--unused-days", "30"], input="n\n")
    assert listed.exit_code == 0 and old.prefix in listed.output and "nothing deleted" in listed.output
    assert store.loc.exists(f"{old.prefix}/manifest.json")
    dry = runner.invoke(main, ["gc", req.store, "--unused-days", "30", "--dry-run"])
    assert old.prefix in dry.output and store.loc.exists(f"{old.prefix}/manifest.json")
    gone = runner.invoke(main, ["gc", req.store, "--unused-days", "30"], input="y\n")
    assert gone.exit_code == 0 and "deleted 1 entry" in gone.output
    assert not (store.root / old.prefix).exists()
    keep = store.find("features", rep.entries["features t=200"])
    assert keep.read("mid_block").shape[0] == 5  # the others are untouched
    named = runner.invoke(main, ["gc", req.store, "--entry", f"features/{keep.key[:6]}", "--yes"])
    assert named.exit_code == 0 and not (store.root / keep.prefix).exists()
    assert runner.invoke(main, ["gc", req.store]).exit_code != 0  # says what to remove
    from vermouth_cache.store.check import verify

    assert verify(Store(req.store), progress=False).ok
