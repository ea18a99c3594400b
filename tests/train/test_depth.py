"""`train depth` from the cache: VPD's depth head learns synthetic scenes well past predicting the
mean, and the reported metrics equal an independent computation from the saved head.

The data is the BTS/VPD NYU layout written by `make_depth` (scene folders, uint16 mm PNGs with holes);
features are `extract --method vpd --prompt table-class` on the tiny SD, the table made from its own
text encoder. Views: 2 drawn crops per training image; the test's two shift windows, each mirrored.
"""

from __future__ import annotations

from pathlib import Path

import json

import numpy as np
import pytest
import torch

from vermouth_cache.data.datasets import load_dataset
from vermouth_cache.data.depth import read_depth, scene_classes
from vermouth_cache.data.synthetic_dense import make_depth
from vermouth_cache.extract.context_tables import make_table
from vermouth_cache.extract.targets import view_depth
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.extract.run import extract
from vermouth_cache.store.entries import Store
from vermouth_cache.train.common import RunOptions
from vermouth_cache.train.runs import load_head
from vermouth_cache.train.tasks import task_settings
from vermouth_cache.train.tasks.depth import DepthData, train_depth

RES = 128  # views are 96x96 crops of 96x128 images, zero-padded to 128 (VPD: 480 of 480x640, to 512)


@pytest.fixture(scope="module")
def nyu(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("depth")
    data = make_depth(root / "nyu", n_train=8, n_test=4, size=(96, 128))
    table = make_table(root / "scenes.safetensors", str(tiny["sd"]), list(scene_classes(data)), ["a photo of a {}."])
    store = root / "store"
    for split, views in (("train", 2), ("test", 1)):
        extract(ExtractRequest(dataset=str(data), split=split, views=views, store=str(store), method="vpd",
                               prompt="table-class", context_table=str(table), attn_maps="none", resolution=RES,
                               sd_model=str(tiny["sd"]), device="cpu", progress=False))
    return {"data": data, "store": store, "root": root}


def test_views_and_their_depth_maps_line_up(nyu):
    train = load_dataset(nyu["data"], split="train", views=2)
    test = load_dataset(nyu["data"], split="test")
    assert len(train) == 16 and len(test) == 16  # 8 x 2 drawn views; 4 x 2 windows x 2 mirrors
    assert {s.classname for s in train.samples} == {"kitchen", "office", "study room", "living room"}
    s = next(x for x in test.samples if x.view.flip and x.view.box[0] > 0)
    raw = read_depth(s.depth)
    left, top, right, bottom = s.view.box
    want = raw[top:bottom, left:right][:, ::-1]
    got = view_depth(s, RES)
    np.testing.assert_array_equal(got[:96, :96], want)
    assert (got[96:] == 0).all() and (got[:, 96:] == 0).all()  # padding holds no ground truth


def _reference_metrics(pred: np.ndarray, gt: np.ndarray) -> dict:
    valid = (gt > 1e-3) & (gt < 10)
    p, g = pred[valid], gt[valid]
    r = np.maximum(p / g, g / p)
    e = np.log(p) - np.log(g)
    return {"d1": (r < 1.25).mean(), "abs_rel": (np.abs(p - g) / g).mean(), "rmse": np.sqrt(((p - g) ** 2).mean()),
            "log10": np.abs(np.log10(p) - np.log10(g)).mean(), "silog": np.sqrt((e ** 2).mean() - 0.5 * e.mean() ** 2)}


def test_depth_learns_well_past_the_mean_and_its_metrics_are_independent(nyu, tmp_path):
    s = task_settings("depth", resolution=RES, epochs=20, batch_size=4, head_width=0.125, lr=1e-3)
    out = tmp_path / "run"
    m = train_depth(DepthData(str(nyu["data"]), views=2), s, RunOptions(store=str(nyu["store"]), out=str(out),
                                                                         progress=False))
    train = load_dataset(nyu["data"], split="train", views=2)
    test = load_dataset(nyu["data"], split="test")
    mean = np.concatenate([read_depth(p)[read_depth(p) > 0] for p in {x.depth for x in train.samples}]).mean()
    gts = {p: read_depth(p) for p in sorted({x.depth for x in test.samples}, key=str)}
    baseline = np.mean([_reference_metrics(np.full(g.shape, mean), g)["rmse"] for g in gts.values()])
    assert m["rmse"] < 0.6 * baseline, (m["rmse"], baseline)  # the trivial predictor: the training mean
    assert m["images"] == 4 and (out / "depth_examples.png").stat().st_size > 1000

    # the same numbers from the saved head, the cached test features and a by-hand window average
    head, config, _ = load_head(out)
    assert config["uses_label_at_test"] is True and json.loads((out / "metrics.json").read_text())["rmse"] == m["rmse"]
    store = Store(str(nyu["store"]))
    feats = next(e for e in store.entries("features") if e.manifest["about"]["dataset"] == test.name)
    sums = {p: np.zeros((96, 128)) for p in gts}
    counts = {p: np.zeros((96, 128)) for p in gts}
    with torch.no_grad():
        for i, x in enumerate(test.samples):
            batch = {n: torch.from_numpy(feats.read(n, [i])).float() for n in feats.array_names()}
            pred = head(batch, 96)[0, 0, :96, :96].numpy()
            pred = pred[:, ::-1] if x.view.flip else pred
            left, top, right, bottom = x.view.box
            sums[x.depth][top:bottom, left:right] += pred
            counts[x.depth][top:bottom, left:right] += 1
    ref = [_reference_metrics(sums[p] / counts[p], g) for p, g in gts.items()]
    for k in ("d1", "abs_rel", "rmse", "log10", "silog"):
        assert m[k] == pytest.approx(np.mean([r[k] for r in ref]), rel=1e-5, abs=1e-6), k


def test_online_and_frozen_prompt_modes(nyu, tiny, tmp_path):
    """VPD-online trains the text adapter through the U-net from cached latents; the frozen prompt
    stores the adapted table, extracts once with it and trains from that cache."""
    from vermouth_cache.data.tables import read_table
    from vermouth_cache.train.online import TextAdapter

    base = dict(resolution=RES, epochs=4, batch_size=4, head_width=0.125, lr=1e-3)
    opts = lambda out: RunOptions(store=str(nyu["store"]), out=str(tmp_path / out), sd_model=str(tiny["sd"]),  # noqa: E731
                                  progress=False)
    data = DepthData(str(nyu["data"]), views=2)
    online = train_depth(data, task_settings("depth", adapter=True, **base), opts("online"))
    assert online["mode"] == "vpd-online" and online["rmse"] > 0
    _, _, extra = load_head(tmp_path / "online")
    gamma = extra["adapter.gamma"]
    assert gamma.shape == (32,) and not torch.allclose(gamma, torch.full_like(gamma, 1e-4))  # it trained
    adapter = TextAdapter(32)
    assert torch.allclose(adapter.gamma, torch.full((32,), 1e-4))  # VPD's init

    frozen_prompt = train_depth(data, task_settings("depth", freeze_prompt_after=6, **base), opts("prompt"))
    table = read_table(tmp_path / "prompt" / "adapted_table.safetensors")
    assert frozen_prompt["adapted_table"] == table.sha256 and table.about["adapted_from"]
    store = Store(str(nyu["store"]))
    tables = {e.manifest["recipe"]["prompt"].get("table") for e in store.entries("captions")}
    assert table.sha256 in tables and len(tables) >= 2  # the adapted table's own cache beside the original
    with pytest.raises(Exception, match="give --sd-model"):
        train_depth(data, task_settings("depth", adapter=True, **base),
                    RunOptions(store=str(nyu["store"]), out=str(tmp_path / "x"), progress=False,
                               select=(("table", str(nyu["root"] / "scenes.safetensors")),)))


def test_depth_maps_must_be_16_bit_and_as_large_as_their_image(tmp_path):
    from PIL import Image

    from vermouth_cache.core.errors import VermouthError
    from vermouth_cache.data.views import View
    from vermouth_cache.data.samples import Sample

    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "d8.png")
    with pytest.raises(VermouthError, match="not a single-channel 16-bit PNG"):
        read_depth(tmp_path / "d8.png")
    Image.fromarray(np.full((4, 4), 2000, np.uint16)).save(tmp_path / "small.png")
    s = Sample("x.png@0,0,8,8", tmp_path / "x.png", 0, "a", view=View((0, 0, 8, 8)), depth=tmp_path / "small.png")
    with pytest.raises(VermouthError, match="smaller than its image"):
        view_depth(s, 8)


def test_predict_draws_the_depth_of_new_images(nyu, tmp_path):
    """`predict` on a depth run: the image's class row conditions it (--classname), the map is drawn
    beside the crop; without the class, the table-class prompt is refused."""
    from PIL import Image

    from vermouth_cache.core.errors import VermouthError
    from vermouth_cache.train.predict import predict

    train_depth(DepthData(str(nyu["data"]), views=2), task_settings("depth", resolution=RES, epochs=1, batch_size=4,
                                                                    head_width=0.125),
                RunOptions(store=str(nyu["store"]), out=str(tmp_path / "run"), progress=False,
                           select=(("table", str(nyu["root"] / "scenes.safetensors")),)))  # not the adapted table's
    sample = load_dataset(nyu["data"], split="test").samples[0]
    rep = predict(tmp_path / "run", sample.path, tmp_path / "p", classname=sample.classname, progress=False)
    (p,) = rep["predictions"]
    img = Image.open(p["png"])
    assert img.width == 2 * img.height and 0 <= p["depth_min_m"] <= p["depth_max_m"] <= 10
    with pytest.raises(VermouthError, match="needs a class per sample|has no row"):
        predict(tmp_path / "run", sample.path, tmp_path / "q", progress=False)
    # two images of one name in two subfolders: each keeps its own map, under its own path
    for sub in ("a", "b"):
        (tmp_path / "two" / sub).mkdir(parents=True)
        (tmp_path / "two" / sub / "x.png").write_bytes(Path(sample.path).read_bytes())
    rep = predict(tmp_path / "run", tmp_path / "two", tmp_path / "r", classname=sample.classname, progress=False)
    assert sorted(Path(p["png"]).relative_to(tmp_path / "r").as_posix() for p in rep["predictions"]) == [
        "a/x.png.depth.png", "b/x.png.depth.png"]
