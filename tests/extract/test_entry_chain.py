"""An entry and the chain it is made from (captions -> text, latents -> features; expert) stay usable
together: gc keeps what a kept entry needs, every recipe field that tells entries apart can be
selected, one extraction's entries share one shard size, and repair works from any directory."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest

from conftest import cli
from vermouth_cache.extract.repair import repair
from vermouth_cache.store.check import verify
from vermouth_cache.extract.run import extract
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.store.entries import Store
from vermouth_cache.data.synthetic import make_classification
from vermouth_cache.train.common import RunOptions
from vermouth_cache.train.tasks import task_settings

RES, T = 64, 10
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def cls(tiny, tmp_path_factory):
    """A 3-class CoOp split (4/2/2 images a class) extracted at t=10, mid block, null prompt."""
    root = tmp_path_factory.mktemp("chain")
    split = make_classification(root / "cls", n_classes=3, per_class=(4, 2, 2), size=64)
    base = _base(tiny, root / "store")
    for part in SPLITS:
        extract(ExtractRequest(dataset=str(split), split=part, **base))
    return {"root": root, "store": root / "store", "split": split, "tiny": tiny, "base": base}


def _base(tiny, store) -> dict:
    return dict(store=str(store), sd_model=str(tiny["sd"]), captioner=str(tiny["blip"]), resolution=RES, t=(T,),
                stages="mid", prompt="null", device="cpu", shard_size=4, progress=False)


def _copy(cls, tmp_path) -> str:
    store = tmp_path / "store"
    shutil.copytree(cls["store"], store)
    return str(store)


def _train(cls, store: str, out, **settings) -> dict:
    from vermouth_cache.train.tasks.fewshot import FewshotData, train_fewshot

    s = task_settings("fewshot", **{"t": T, "resolution": RES, "stages": "mid", "prompt": "null", "expert": "none",
                                    "attn_maps": "none", "epochs": 1, "batch_size": 4, **settings})
    return train_fewshot(FewshotData(str(cls["split"]), shots=2), s,
                         RunOptions(store=store, out=str(out), clip_model=str(cls["tiny"]["clip"]), device="cpu",
                                    progress=False, overwrite=True))


def _age(entry, days: float = 40) -> None:
    entry.loc.write_json(f"{entry.prefix}/used.json", {"last_used": time.time() - days * 86400})


def _short(entry) -> str:
    return f"{entry.kind}/{entry.key[:12]}"


# ---------------------------------------------------------------- 8: gc and the entry chain


def test_training_marks_the_whole_chain_and_gc_keeps_what_kept_entries_need(cls, tmp_path, monkeypatch, capsys):
    store = _copy(cls, tmp_path)
    extract(ExtractRequest(dataset=str(cls["split"]), split="train", **{**cls["base"], "store": store, "t": (20,)}))
    for e in Store(store).entries():
        _age(e)  # nothing used for 40 days ...
    first = _train(cls, store, tmp_path / "run1")  # ... then a run trains from t=10
    used = {p for split in first["entries"].values() for p in (f"features/{split['features']}",)}
    st = Store(store)
    recent = {e.prefix for e in st.entries() if e.last_used() > time.time() - 600}
    chains = {e.prefix for e in st.entries() if e.prefix not in recent}
    t20 = _features(st, 20)[0]
    assert chains == {t20.prefix}  # features, and the latents, text and captions behind them, are used
    assert used < recent and {e.kind for e in st.entries() if e.prefix in recent} == {
        "captions", "text", "latents", "features", "classtext"}
    code, out, err = cli(monkeypatch, capsys, "gc", store, "--unused-days", "30", "--yes")
    assert code == 0, err
    assert "deleted 1 entry" in out and t20.prefix in out and "kept:" not in out
    second = _train(cls, store, tmp_path / "run2")  # used to say "no features ... run extract first"
    assert second["entries"] == first["entries"]

    # a store whose upstream entries carry old use dates (an older vermouth-cache marked only the
    # features): gc keeps them for the features that stay, and says so
    test_feats = Store(store).find("features", first["entries"]["test"]["features"])
    r = test_feats.manifest["recipe"]
    lat, txt = st.find("latents", r["latents"]), st.find("text", r["text"])
    cap = st.find("captions", txt.manifest["recipe"]["captions"])
    for e in (lat, txt, cap):
        _age(e)
    code, out, err = cli(monkeypatch, capsys, "gc", store, "--unused-days", "30", "--yes")
    assert code == 0, err
    assert f"kept: {_short(lat)} needed by {_short(test_feats)}" in out
    assert f"kept: {_short(txt)} needed by {_short(test_feats)}" in out
    assert f"kept: {_short(cap)} needed by {_short(txt)}" in out and "nothing to remove" in out
    # naming an upstream entry alone, while a staying entry needs it, is refused in one line
    code, out, err = cli(monkeypatch, capsys, "gc", store, "--entry", _short(lat), "--yes")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (f"{_short(lat)} is needed by {_short(test_feats)}, which stays: name it too "
            f"(--entry {_short(test_feats)}) to remove both") in err
    assert Store(store).loc.exists(f"{lat.prefix}/manifest.json")
    _train(cls, store, tmp_path / "run3")
    # named together, both go (the text and captions stay: nothing forces them out)
    code, out, err = cli(monkeypatch, capsys, "gc", store, "--entry", _short(lat), "--entry", _short(test_feats),
                         "--yes")
    assert code == 0 and "deleted 2 entries" in out, err
    assert verify(Store(store, read_only=True), progress=False).ok


def _features(store: Store, t: int):
    return [e for e in store.entries("features") if e.manifest["recipe"]["t"] == t]


# ---------------------------------------------------------------- 10a: shard sizes of a chain


def test_a_second_run_with_another_shard_size_keeps_the_chains_and_says_so(monkeypatch, capsys, tiny, folder,
                                                                            tmp_path):
    store = tmp_path / "store"
    base = [folder, "--store", store, "--sd-model", tiny["sd"], "--captioner", tiny["blip"], "--resolution", "128",
            "--device", "cpu", "--quiet", "--prompt", "null", "--stages", "mid"]
    code, _, err = cli(monkeypatch, capsys, "extract", *base, "--t", "100", "--shard-size", "3")
    assert code == 0, err
    # the default shard size (64, i.e. 5 for 5 images) used to make a t=200 entry of 5-sample
    # shards beside captions of 3: "ValueError: 3 statuses for 5 samples", broken for good
    code, out, err = cli(monkeypatch, capsys, "extract", *base, "--t", "200")
    assert code == 0, err
    assert "note: shard size 3 kept" in out and "asked 64" in out
    st = Store(store)
    (f200,) = _features(st, 200)
    assert f200.shard_size == 3 and f200.read("mid_block").shape[0] == 5
    assert verify(Store(store, read_only=True), deep=True, progress=False).ok
    # later runs, with yet another shard size and more work, go on using the store
    code, out, err = cli(monkeypatch, capsys, "extract", *base, "--t", "100,200,300", "--stages", "mid,up",
                         "--shard-size", "2")
    assert code == 0, err
    assert "note: shard size 3 kept" in out and "asked 2" in out
    assert all(e.shard_size == 3 for e in Store(store).entries())
    assert _features(Store(store), 300)[0].read("up_blocks.1").shape[0] == 5
    assert verify(Store(store, read_only=True), deep=True, progress=False).ok
    code, out, _ = cli(monkeypatch, capsys, "extract", *base, "--t", "300", "--stages", "mid,up", "--shard-size", "3")
    assert code == 0 and "note:" not in out and "nothing (all cached)" in out


def test_a_chain_of_mixed_shard_sizes_is_refused_in_one_line_naming_the_odd_entry(monkeypatch, capsys, tiny,
                                                                                   folder, tmp_path):
    store = tmp_path / "store"
    base = [folder, "--store", store, "--sd-model", tiny["sd"], "--captioner", tiny["blip"], "--resolution", "128",
            "--device", "cpu", "--quiet", "--prompt", "null", "--stages", "mid", "--shard-size", "3"]
    assert cli(monkeypatch, capsys, "extract", *base, "--t", "100,200")[0] == 0
    # what an older vermouth-cache left: a features entry whose shards differ from its upstream's
    (f200,) = _features(Store(store), 200)
    manifest = store / f200.prefix / "manifest.json"
    m = json.loads(manifest.read_text())
    m["shard_size"] = 5
    manifest.write_text(json.dumps(m))
    for rec in (store / f200.prefix / "shards").rglob("*.json"):
        rec.unlink()
    before = sorted(p for p in store.rglob("*") if p.is_file())
    code, out, err = cli(monkeypatch, capsys, "extract", *base, "--t", "100,200")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "different shard sizes" in err and f"features/{f200.key[:12]}: 5" in err and "captions/" in err
    assert f"gc --entry features/{f200.key[:12]}" in err
    assert sorted(p for p in store.rglob("*") if p.is_file()) == before  # refused before any work
    # the remedy it names works
    code, _, err = cli(monkeypatch, capsys, "gc", store, "--entry", f"features/{f200.key[:12]}", "--yes")
    assert code == 0, err
    assert cli(monkeypatch, capsys, "extract", *base, "--t", "100,200")[0] == 0
    assert verify(Store(store, read_only=True), deep=True, progress=False).ok


# ---------------------------------------------------------------- 10b: repair from another directory


def test_repair_from_another_directory_finds_a_dataset_given_as_a_relative_path(request_for, folder, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.chdir(folder.parent)
    req = request_for("imgs", stages="mid", prompt="null")  # DATASET as typed: relative to the cwd
    rep = extract(req)
    store = Store(req.store)
    feats = store.find("features", rep.entries["features t=200"])
    chunk = feats.loc.path(feats.chunk_key("mid_block", 1))
    good = chunk.read_bytes()
    chunk.write_bytes(good[:-7])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = repair(Store(req.store), progress=False)
    assert not out.refused, out.refused
    assert out.repaired == {feats.prefix: {"mid_block": [1]}} and out.after.ok
    assert chunk.read_bytes() == good
    assert feats.manifest["about"]["request"]["dataset"] == str(folder)  # kept absolute


# ---------------------------------------------------------------- 9: every recipe field can be selected


@pytest.fixture(scope="module")
def seeds(cls, tmp_path_factory):
    """The module's store plus seed-1 extractions of every split, and a fp32 one of the test split."""
    root = tmp_path_factory.mktemp("seeds")
    store = root / "store"
    shutil.copytree(cls["store"], store)
    base = {**cls["base"], "store": str(store)}
    for part in SPLITS:
        extract(ExtractRequest(dataset=str(cls["split"]), split=part, **{**base, "seed": 1}))
    extract(ExtractRequest(dataset=str(cls["split"]), split="test", **{**base, "dtype": "fp32"}))
    st = Store(store)
    by = {}
    for e in st.entries("features"):
        r = e.manifest["recipe"]
        by[(e.manifest["about"]["dataset"], r["noise"]["seed"], r["dtype"])] = e.key
    return {**cls, "root": root, "store": str(store), "keys": by}


def _train_args(c, out, *extra):
    return ["train", "fewshot", "--store", c["store"], "--dataset", c["split"], "--shots", "2", "--out", out,
            "--t", str(T), "--resolution", str(RES), "--stages", "mid", "--prompt", "null", "--expert", "none",
            "--attn-maps", "none", "--epochs", "1", "--batch-size", "4", "--clip-model", c["tiny"]["clip"],
            "--device", "cpu", "--quiet", *extra]


def test_train_selects_the_noise_seed_and_an_ambiguous_request_lists_the_candidates(seeds, tmp_path, monkeypatch,
                                                                                   capsys):
    keys = seeds["keys"]
    s0, s1 = keys[("Synth/train", 0, "fp16")], keys[("Synth/train", 1, "fp16")]
    # used to say "name the SD model (--sd-model) or --dtype", and neither could pick the entry
    code, _, err = cli(monkeypatch, capsys, *_train_args(seeds, tmp_path / "run0"))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    first, second = sorted([s0, s1])
    seed_of = {s0: 0, s1: 1}
    assert (f"2 features entries of Synth/train match: {first[:12]} (noise-seed {seed_of[first]}), "
            f"{second[:12]} (noise-seed {seed_of[second]}); add --noise-seed") in err
    code, out, err = cli(monkeypatch, capsys, *_train_args(seeds, tmp_path / "run1", "--noise-seed", "1"))
    assert code == 0, err
    metrics = json.loads((tmp_path / "run1" / "metrics.json").read_text())
    assert metrics["entries"]["train"]["features"] == s1
    assert metrics["entries"]["val"]["features"] == keys[("Synth/val", 1, "fp16")]
    assert json.loads((tmp_path / "run1" / "config.json").read_text())["select"] == {"noise_seed": 1}
    # the test split also holds a fp32 copy of seed 0: seed 0 alone is still ambiguous, and says how to choose
    code, _, err = cli(monkeypatch, capsys, *_train_args(seeds, tmp_path / "run2", "--noise-seed", "0"))
    assert code == 1 and "2 features entries of Synth/test match" in err and "(dtype fp16)" in err
    assert "(dtype fp32)" in err and err.strip().endswith("add --dtype")
    code, _, err = cli(monkeypatch, capsys, *_train_args(seeds, tmp_path / "run2", "--noise-seed", "0",
                                                         "--dtype", "fp16"))
    assert code == 0, err
    metrics = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert metrics["entries"]["test"]["features"] == keys[("Synth/test", 0, "fp16")]
    code, _, err = cli(monkeypatch, capsys, *_train_args(seeds, tmp_path / "run3", "--noise-seed", "7"))
    assert code == 1 and re.search(r"noise_seed \(cached [01], requested 7\)", err), err  # the nearest of two equally near


def test_export_and_ls_tell_the_entries_apart(seeds, tmp_path, monkeypatch, capsys):
    import h5py

    keys = seeds["keys"]
    ask = ["export", seeds["store"], "--out", tmp_path / "x.h5", "--dataset", seeds["split"], "--split", "test",
           "--t", str(T), "--resolution", str(RES), "--prompt", "null"]
    code, _, err = cli(monkeypatch, capsys, *ask)
    assert code == 1 and "3 features entries of Synth/test match" in err
    assert "(noise-seed 1, dtype fp16)" in err and "(noise-seed 0, dtype fp32)" in err
    assert err.strip().endswith("add --noise-seed or --dtype")
    code, out, err = cli(monkeypatch, capsys, *ask, "--noise-seed", "0", "--dtype", "fp32")
    assert code == 0, err
    with h5py.File(tmp_path / "x.h5") as f:
        assert f.attrs["key"] == keys[("Synth/test", 0, "fp32")]
        assert json.loads(f.attrs["recipe"])["noise"]["seed"] == 0 and f["features/mid_block"].dtype == "float32"
    code, _, err = cli(monkeypatch, capsys, "export", seeds["store"], "--out", tmp_path / "y.h5", "--noise-seed", "1")
    assert code == 1 and "go with --dataset" in err
    code, out, _ = cli(monkeypatch, capsys, "ls", seeds["store"], "--kind", "features")
    assert code == 0
    rows = {line.split()[1]: line for line in out.splitlines()[1:]}
    assert "ddpm seed 1" in rows[keys[("Synth/test", 1, "fp16")]] and " fp16 " in rows[keys[("Synth/test", 1, "fp16")]]
    assert "ddpm seed 0" in rows[keys[("Synth/test", 0, "fp32")]] and " fp32 " in rows[keys[("Synth/test", 0, "fp32")]]


def test_a_sweep_trains_from_the_features_its_extract_options_make(seeds, tmp_path):
    from vermouth_cache.sweep import SweepOptions, load_recipe, run_sweep

    store = tmp_path / "store"
    shutil.copytree(seeds["store"], store)
    recipe = tmp_path / "seed1.yaml"
    recipe.write_text(f"""
task: fewshot
datasets:
  synth: {{path: "{seeds['split']}", shots: 2}}
models: tiny
extract: {{seed: 1, dtype: fp16, shard_size: 4}}
train: {{resolution: {RES}, t: {T}, stages: mid, prompt: "null", expert: none, attn_maps: none, epochs: 1,
         batch_size: 4}}
""")
    res = run_sweep(load_recipe(recipe), SweepOptions(out=str(tmp_path / "out"), store=str(store), progress=False,
                                                      workers=1))
    (rec,) = res.records
    assert rec["status"] == "done", rec
    train = Store(store).find("features", rec["entries"]["features"])  # the sweep's own 2-shot extraction
    assert train.manifest["recipe"]["noise"]["seed"] == 1
    metrics = json.loads((tmp_path / "out" / rec["run"] / "metrics.json").read_text())
    assert metrics["entries"]["test"]["features"] == seeds["keys"][("Synth/test", 1, "fp16")]
