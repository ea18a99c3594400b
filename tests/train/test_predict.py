"""`predict` and `embed`: a trained few-shot head on new images, their features made with the
run's recipe into its store; the probabilities and embeddings equal the head applied by hand to
the features the store already holds for the same image bytes. An image the store holds under
another dataset (here: the run's own splits) is read from there, not computed, exactly where its
features would be the same (`extract.reuse`), and a damaged stored row raises."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import cli
from vermouth_cache.data.datasets import load_dataset
from vermouth_cache.data.synthetic import make_classification
from vermouth_cache.extract.classtext import class_text_features
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.extract.run import extract
from vermouth_cache.store.entries import Store
from vermouth_cache.train.common import RunOptions
from vermouth_cache.train.heads import TextClassifier
from vermouth_cache.train.predict import embed, predict
from vermouth_cache.train.runs import load_head
from vermouth_cache.train.tasks import task_settings
from vermouth_cache.train.tasks.fewshot import FewshotData, train_fewshot

RES = 64


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    split = make_classification(root / "data", n_classes=3, per_class=(4, 2, 2), size=64)
    base = ExtractRequest(dataset=str(split), store=str(root / "store"), sd_model=str(tiny["sd"]), prompt="null",
                          resolution=RES, t=(10,), stages="mid,up", device="cpu", progress=False)
    for sp in ("train", "val", "test"):
        extract(base.with_(split=sp))
    s = task_settings("fewshot", t=10, resolution=RES, stages="mid,up", attn_maps="none", expert="none",
                      prompt="null", epochs=3, batch_size=4, lr=1e-3)
    train_fewshot(FewshotData(str(split), shots=4), s, RunOptions(store=str(root / "store"), out=str(root / "run"),
                                                                  clip_model=str(tiny["clip"]), progress=False))
    return {"root": root, "split": split, "run": root / "run", "store": root / "store"}


def by_hand(run_dir, store, ids_bytes):
    """The head and class prompts applied to the test split's cached features, keyed by image bytes."""
    head, config, _ = load_head(run_dir)
    test = load_dataset(config["data"]["dataset"], split="test")
    st = Store(str(store))
    key = json.loads((run_dir / "metrics.json").read_text())["entries"]["test"]["features"]
    feats = st.find("features", key)
    batch = {n: torch.from_numpy(feats.read(n).astype(np.float32)) for n in ("mid_block", *[f"up_blocks.{i}" for i in range(4)])}
    with torch.no_grad():
        emb = head(batch)
        text = class_text_features(st, config["classnames"], config["templates"], config["clip_model"], proj=False)
        p = TextClassifier(torch.from_numpy(text), config["temperature"])(emb).softmax(1)
    return {s.path.read_bytes(): (p[i].numpy(), emb[i].numpy()) for i, s in enumerate(test.samples)}


def count_unet(monkeypatch) -> list[int]:
    """Samples through the U-net from now on (every extraction's U-net calls go through this function)."""
    from vermouth_cache.extract import compute

    seen, real = [], compute.unet_features
    monkeypatch.setattr(compute, "unet_features", lambda sd, latents, *a, **kw: seen.append(len(latents))
                        or real(sd, latents, *a, **kw))
    return seen


def test_predict_and_embed_reuse_the_rows_stored_under_the_runs_splits(run, tmp_path, monkeypatch, capsys):
    images = run["split"].parent / "images"
    passes = count_unet(monkeypatch)
    code, stdout, err = cli(monkeypatch, capsys, "predict", run["run"], images, "--out", tmp_path / "p", "--top-k", "3",
                            "--quiet")
    assert code == 0, err
    rep = json.loads((tmp_path / "p" / "predictions.json").read_text())
    # 3 classes x 8 images, all in the store under the run's train, val and test splits: nothing computed
    assert rep["images"] == 24 and (rep["reused"], rep["extracted"], rep["computed"]) == (24, 0, {}) and passes == []
    assert "features of 24 reused from the store, 0 extracted" in stdout and len(rep["features"]) == 3
    assert not (tmp_path / "p" / "extract.csv").exists()
    want = by_hand(run["run"], run["store"], None)
    ds = load_dataset(tmp_path / "p" / "images.csv", image_root=images)
    path_of = {s.id: s.path for s in ds.samples}
    assert [p["id"] for p in rep["predictions"]] == [s.id for s in ds.samples]
    head_config = json.loads((run["run"] / "config.json").read_text())
    checked = 0
    for p in rep["predictions"]:
        probs = want.get(path_of[p["id"]].read_bytes())
        if probs is None:
            continue  # a train or val image: not in the test split's features
        top = np.argsort(-probs[0])[:3]
        assert [t["class"] for t in p["top"]] == [head_config["classnames"][i] for i in top]
        assert np.allclose([t["p"] for t in p["top"]], probs[0][top], atol=1e-6)
        checked += 1
    assert checked == 6 and f"{p['id']}: " in stdout

    # the same images computed anew (no lookup): the same probabilities, to the rounding of the JSON
    from vermouth_cache.extract.reuse import Reusable

    monkeypatch.setattr("vermouth_cache.train.predict.find_reusable",
                        lambda store, req, ds, **kw: Reusable([], list(range(len(ds)))))
    fresh = predict(run["run"], images, tmp_path / "fresh", top_k=3, progress=False)
    monkeypatch.undo()
    assert (fresh["reused"], fresh["extracted"]) == (0, 24) and fresh["computed"]["unet"] == 24
    assert [p["id"] for p in fresh["predictions"]] == [p["id"] for p in rep["predictions"]]
    for a, b in zip(fresh["predictions"], rep["predictions"]):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert np.allclose([t["p"] for t in a["top"]], [t["p"] for t in b["top"]], atol=1e-6)
    passes = count_unet(monkeypatch)
    again = predict(run["run"], images, tmp_path / "p2", progress=False)
    assert again["computed"] == {} and again["reused"] == 24 and passes == []
    assert again["features"] == fresh["features"]  # the images' own entry, now there, is read first

    res = embed(run["run"], images, tmp_path / "e", progress=False)
    z = np.load(tmp_path / "e" / "embeddings.npz")
    assert res["images"] == len(z["ids"]) == 24 and z["embeddings"].shape[1] == res["dim"] and res["computed"] == {}
    assert list(z["ids"]) == [s.id for s in ds.samples]
    for i, sid in enumerate(z["ids"]):
        got = want.get(path_of[str(sid)].read_bytes())
        if got is not None:
            assert np.allclose(z["embeddings"][i], got[1], atol=1e-6)


def test_an_image_inside_a_bigger_folder_is_reused_and_only_the_rest_extracted(run, tmp_path, monkeypatch):
    import shutil

    from PIL import Image

    src = run["split"].parent / "images"
    test_ids = [s.id for s in load_dataset(run["split"], split="test").samples]
    mixed = tmp_path / "mixed"
    for sid in test_ids[:2]:  # at the same path relative to the folder: the same id, so the same DDPM noise
        (mixed / sid).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / sid, mixed / sid)
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(mixed / "new.png")
    passes = count_unet(monkeypatch)
    rep = predict(run["run"], mixed, tmp_path / "p", top_k=3, progress=False)
    assert (rep["images"], rep["reused"], rep["extracted"]) == (3, 2, 1) and sum(passes) == rep["computed"]["unet"] == 1
    assert (tmp_path / "p" / "extract.csv").read_text().splitlines()[1:] == ["new.png"]
    want = by_hand(run["run"], run["store"], None)
    names = json.loads((run["run"] / "config.json").read_text())["classnames"]
    for p in rep["predictions"]:
        if p["id"] != "new.png":
            probs = want[(mixed / p["id"]).read_bytes()][0]
            top = np.argsort(-probs)[:3]
            assert [t["class"] for t in p["top"]] == [names[i] for i in top]
            assert np.allclose([t["p"] for t in p["top"]], probs[top], atol=1e-6)
    again = predict(run["run"], mixed, tmp_path / "p", top_k=3, progress=False)
    assert (again["reused"], again["computed"]) == (3, {}) and not (tmp_path / "p" / "extract.csv").exists()


def test_rows_are_not_reused_where_the_features_would_differ(run, tmp_path, tiny, monkeypatch):
    """DDPM noise is drawn per sample id: a test image given alone (id: its file name) is computed
    again; with --noise none it is reused. Another seed is another recipe. A classname prompt's text
    comes from --classname: another class name is another text."""
    import shutil

    from vermouth_cache.extract.reuse import find_reusable

    images = run["split"].parent / "images"
    test = load_dataset(run["split"], split="test")
    one = images / test.samples[0].id
    store = tmp_path / "store"
    shutil.copytree(run["store"], store)  # before the call below stores test_000.png under its own id
    passes = count_unet(monkeypatch)
    rep = predict(run["run"], one, tmp_path / "p", top_k=3, progress=False)
    assert (rep["reused"], rep["extracted"]) == (0, 1) and passes == [1]
    again = predict(run["run"], one, tmp_path / "p", top_k=3, progress=False)
    assert (again["reused"], again["computed"]) == (1, {}) and passes == [1]  # now stored under that id

    base = ExtractRequest(dataset=str(run["split"]), split="test", store=str(store), sd_model=str(tiny["sd"]),
                          prompt="null", resolution=RES, t=(10,), stages="mid,up", device="cpu", progress=False)
    arrays = ["mid_block", "up_blocks.0"]

    made = iter(range(100))

    def reused(req, *, classname=None) -> int:
        """Images of a manifest of `one` alone whose rows the store holds for `req`."""
        out = tmp_path / f"m{next(made)}"
        out.mkdir()
        rows = "path" + (",classname" if classname else "") + "\n" + one.name + (f",{classname}" if classname else "")
        (out / "one.csv").write_text(rows + "\n")
        ds = load_dataset(out / "one.csv", image_root=one.parent)
        new = req.with_(dataset=str(out / "one.csv"), image_root=str(one.parent), split=None)
        return find_reusable(Store(str(store)), new, ds, t=10, arrays=arrays).n_reused

    assert reused(base) == 0  # ddpm: id test_000.png is not the stored red_circle/test_000.png
    assert reused(base.with_(seed=1)) == 0
    extract(base.with_(noise="none"))
    extract(base.with_(noise="none", prompt="classname"))
    assert reused(base.with_(noise="none")) == 1  # no noise drawn: the id does not enter the features
    assert reused(base.with_(noise="none", seed=1)) == 1  # no noise drawn: the seed enters nothing either
    right = test.samples[0].classname
    assert reused(base.with_(noise="none", prompt="classname"), classname=right) == 1
    assert reused(base.with_(noise="none", prompt="classname"), classname="blue square") == 0
    assert reused(base.with_(noise="none", resolution=128)) == 0  # another recipe


def test_a_damaged_stored_row_raises_instead_of_being_recomputed(run, tmp_path):
    import shutil

    from vermouth_cache.store.records import ShardDamage

    images = run["split"].parent / "images"
    splits = json.loads((run["run"] / "metrics.json").read_text())["entries"]
    test_key = splits["test"]["features"]
    for damage in ("chunk", "record"):
        store = tmp_path / damage / "store"
        shutil.copytree(run["store"], store)
        st = Store(str(store))
        for e in st.entries("features"):  # only the run's splits hold the images (other tests stored them too)
            if e.key not in {v["features"] for v in splits.values()}:
                st.remove(e)
        entry = st.find("features", test_key)
        if damage == "chunk":
            chunk = entry.root / "arrays" / "mid_block" / "c" / "0" / "0" / "0" / "0"
            data = bytearray(chunk.read_bytes())
            data[100] ^= 0xFF
            chunk.write_bytes(bytes(data))
        else:
            rec = entry.root / "shards" / "up_blocks.0" / "000000.json"
            body = json.loads(rec.read_text())
            body["status"][0] = "error: edited"
            rec.write_text(json.dumps(body))
        before = sorted(p.name for p in (store / "features").iterdir())
        with pytest.raises(ShardDamage) as exc:
            predict(run["run"], images, tmp_path / damage / "p", store=str(store), progress=False)
        array = "mid_block" if damage == "chunk" else "up_blocks.0"
        assert f"features/{entry.key} array {array} shard 0" in str(exc.value)
        assert sorted(p.name for p in (store / "features").iterdir()) == before  # nothing extracted instead


def test_predict_refusals_are_one_line(run, tmp_path, monkeypatch, capsys):
    for args, message in ((["--text", "the red one"], "--text is the referring sentence of a refer head"),
                          ([], "no such image or folder")):
        target = run["split"].parent / "images" if args else tmp_path / "missing"
        code, _, err = cli(monkeypatch, capsys, "predict", run["run"], target, "--out", tmp_path / "o", *args)
        assert code != 0 and message in err and "Traceback" not in err
    code, _, err = cli(monkeypatch, capsys, "predict", tmp_path, tmp_path, "--out", tmp_path / "o")
    assert code != 0 and "is not a run directory" in err
    code, _, err = cli(monkeypatch, capsys, "embed", run["run"], run["split"].parent / "images", "--out",
                       run["store"] / "x")
    assert code != 0 and "Traceback" not in err


def test_a_damaged_run_directory_is_one_line(run, tmp_path, monkeypatch, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run["run"], bad)
    (bad / "head.safetensors").write_bytes(b"\xff" * 64)
    code, _, err = cli(monkeypatch, capsys, "predict", bad, run["split"].parent / "images", "--out", tmp_path / "o")
    assert code != 0 and "is not a head this version can load" in err and "Traceback" not in err
    shutil.copy(run["run"] / "head.safetensors", bad / "head.safetensors")
    (bad / "config.json").write_text("[]")
    code, _, err = cli(monkeypatch, capsys, "embed", bad, run["split"].parent / "images", "--out", tmp_path / "o")
    assert code != 0 and "Traceback" not in err
