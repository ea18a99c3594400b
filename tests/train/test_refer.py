"""`train refer` from the cache: one cached row per (image, sentence) pair, REFER masks from COCO
polygons through pycocotools and a refs pickle read without unpickling code; VPD's SimpleDecoding
learns synthetic scenes well past predicting the largest object, and its scores equal an
independent computation from the saved head."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.datasets import load_dataset
from vermouth_cache.data.synthetic_dense import make_refer
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.extract.run import extract
from vermouth_cache.extract.targets import view_region
from vermouth_cache.store.entries import Store
from vermouth_cache.train.common import RunOptions
from vermouth_cache.train.runs import load_head
from vermouth_cache.train.tasks import task_settings
from vermouth_cache.train.tasks.refer import ReferData, train_refer

RES, TOKENS = 128, 16


@pytest.fixture(scope="module")
def refcoco(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("refer")
    data = make_refer(root / "refcoco", n_train=12, n_val=6, size=(96, 128))
    store = root / "store"
    for split in ("train", "val"):
        extract(ExtractRequest(dataset=str(data), split=split, store=str(store), method="vpd", prompt="sentence",
                               text_tokens=TOKENS, resolution=RES, sd_model=str(tiny["sd"]), device="cpu",
                               progress=False))
    return {"data": data, "store": store}


def test_pairs_masks_and_the_pickle(refcoco, tmp_path):
    train = load_dataset(refcoco["data"], split="train")
    assert len(train) == 12 * 3 * 2 and len({s.text for s in train.samples}) > 6  # every sentence is a sample
    s = train.samples[0]
    seg = json.loads(s.region)
    # REFER getMask by hand: the polygon drawn at full size, squashed by nearest neighbour
    full = Image.new("L", (128, 96), 0)
    ImageDraw.Draw(full).polygon(list(zip(seg[0][::2], seg[0][1::2])), fill=1)
    want = np.asarray(full.resize((RES, RES), Image.Resampling.NEAREST))
    got = view_region(s, RES)
    assert got.shape == (RES, RES) and np.mean(got == want) > 0.97  # PIL and COCO rasterise edges differently
    feats = next(e for e in Store(str(refcoco["store"])).entries("features")
                 if e.manifest["about"]["dataset"] == train.name)
    assert feats.read("attn.level1", [0]).shape[1] == TOKENS  # the maps' channels are the sentence's tokens

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "instances.json").write_text((refcoco["data"] / "instances.json").read_text())

    class Boom:
        def __reduce__(self):
            return (print, ("ran",))
    (evil / "refs(unc).p").write_bytes(pickle.dumps([Boom()]))
    with pytest.raises(VermouthError, match="refuses the pickled global"):
        load_dataset(evil, split="train")


def test_refer_learns_well_past_the_largest_object_and_scores_are_independent(refcoco, tmp_path):
    s = task_settings("refer", resolution=RES, epochs=30, batch_size=8, head_width=0.25, lr=3e-3)
    out = tmp_path / "run"
    m = train_refer(ReferData(str(refcoco["data"])), s, RunOptions(store=str(refcoco["store"]), out=str(out),
                                                                     progress=False))
    val = load_dataset(refcoco["data"], split="val")
    gts = [view_region(x, RES) > 0.5 for x in val.samples]
    # the trivial predictor: the largest object of the image, whatever the sentence says
    by_image: dict = {}
    for x, g in zip(val.samples, gts):
        by_image.setdefault(x.path, []).append(g)
    largest = {p: max(ms, key=lambda g: g.sum()) for p, ms in by_image.items()}
    inter = sum((largest[x.path] & g).sum() for x, g in zip(val.samples, gts))
    union = sum((largest[x.path] | g).sum() for x, g in zip(val.samples, gts))
    baseline = inter / union
    assert m["oIoU"] > baseline + 0.12, (m["oIoU"], baseline)

    head, config, _ = load_head(out)
    feats = next(e for e in Store(str(refcoco["store"])).entries("features") if e.manifest["about"]["dataset"] == val.name)
    ious, inters, unions = [], 0, 0
    with torch.no_grad():
        for i, g in enumerate(gts):
            batch = {n: torch.from_numpy(feats.read(n, [i])).float() for n in feats.array_names()}
            pred = F.interpolate(head(batch), size=(RES, RES), mode="bilinear", align_corners=True).argmax(1)[0].numpy() == 1
            inter, union = (pred & g).sum(), (pred | g).sum()
            ious.append(inter / union if union else 0.0)
            inters, unions = inters + inter, unions + union
    assert m["mIoU"] == pytest.approx(np.mean(ious), abs=1e-9)
    assert m["oIoU"] == pytest.approx(inters / unions, abs=1e-9)
    assert m["P@0.5"] == pytest.approx(np.mean(np.array(ious) >= 0.5), abs=1e-9) and m["pairs"] == len(gts)


def test_refer_online_adapts_every_token(refcoco, tiny, tmp_path):
    s = task_settings("refer", resolution=RES, epochs=2, batch_size=8, head_width=0.125, lr=1e-3, adapter=True)
    m = train_refer(ReferData(str(refcoco["data"])), s, RunOptions(store=str(refcoco["store"]), out=str(tmp_path / "o"),
                                                                   sd_model=str(tiny["sd"]), progress=False))
    assert m["mode"] == "vpd-online" and 0 <= m["oIoU"] <= 1
    _, _, extra = load_head(tmp_path / "o")
    assert not torch.allclose(extra["adapter.gamma"], torch.full((32,), 1e-4))
    with pytest.raises(VermouthError, match="adapts a context table"):
        task_settings("refer", freeze_prompt_after=5)
    with pytest.raises(VermouthError, match="online modes: method vpd"):
        task_settings("fewshot", adapter=True)


def test_an_image_with_many_sentences_is_decoded_and_encoded_once(refcoco, tiny, tmp_path, monkeypatch):
    """One VAE pass per image, however many sentences refer to it; its latent is every pair's row,
    bit-identical to what the cache already holds."""
    from vermouth_cache.extract import compute

    seen = []
    real = compute.vae_latents
    monkeypatch.setattr(compute, "vae_latents", lambda sd, images, **kw: seen.append(len(images)) or real(sd, images, **kw))
    val = load_dataset(refcoco["data"], split="val")
    req = ExtractRequest(dataset=str(refcoco["data"]), split="val", store=str(tmp_path / "s"), method="vpd",
                         prompt="sentence", text_tokens=TOKENS, resolution=RES, sd_model=str(tiny["sd"]),
                         device="cpu", progress=False, batch_size=5)
    rep = extract(req)
    assert sum(seen) == len({s.path for s in val.samples}) == 6 < len(val)
    latents = Store(req.store).find("latents", rep.entries["latents"]).read("latent")
    cached = Store(str(refcoco["store"])).find("latents", rep.entries["latents"]).read("latent")
    assert np.array_equal(latents, cached)  # batch 5 over distinct images: the same bytes as the fixture's
    rows = {}
    for s, z in zip(val.samples, latents):
        rows.setdefault(s.path, z)
        assert np.array_equal(rows[s.path], z)
