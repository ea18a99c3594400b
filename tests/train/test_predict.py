"""`predict` and `embed`: a trained few-shot head on new images, their features made with the
run's recipe into its store; the probabilities and embeddings equal the head applied by hand to
the features the store already holds for the same image bytes."""

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


def test_predict_and_embed_equal_the_head_on_cached_features(run, tmp_path, monkeypatch, capsys):
    images = run["split"].parent / "images"
    code, stdout, err = cli(monkeypatch, capsys, "predict", run["run"], images, "--out", tmp_path / "p", "--top-k", "3",
                            "--quiet")
    assert code == 0, err
    rep = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert rep["images"] == 24 and rep["computed"]  # 3 classes x 8 images, extracted now
    want = by_hand(run["run"], run["store"], None)
    ds = load_dataset(tmp_path / "p" / "images.csv", image_root=images)
    path_of = {s.id: s.path for s in ds.samples}
    checked = 0
    for p in rep["predictions"]:
        probs = want.get(path_of[p["id"]].read_bytes())
        if probs is None:
            continue  # a train or val image: not in the test split's features
        top = np.argsort(-probs[0])[:3]
        head_config = json.loads((run["run"] / "config.json").read_text())
        assert [t["class"] for t in p["top"]] == [head_config["classnames"][i] for i in top]
        assert np.allclose([t["p"] for t in p["top"]], probs[0][top], atol=1e-5)
        checked += 1
    assert checked == 6 and f"{p['id']}: " in stdout
    again = predict(run["run"], images, tmp_path / "p2", progress=False)
    assert again["computed"] == {} and again["features"] == rep["features"]  # the same key: nothing recomputed

    res = embed(run["run"], images, tmp_path / "e", progress=False)
    z = np.load(tmp_path / "e" / "embeddings.npz")
    assert res["images"] == len(z["ids"]) == 24 and z["embeddings"].shape[1] == res["dim"]
    for i, sid in enumerate(z["ids"]):
        got = want.get(path_of[str(sid)].read_bytes())
        if got is not None:
            assert np.allclose(z["embeddings"][i], got[1], atol=1e-5)


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
