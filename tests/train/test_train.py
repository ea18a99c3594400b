"""Training from the cache learns, is deterministic, records its run, and refuses a mismatched cache.

Each task trains on a tiny synthetic dataset (vermouth_cache.data.synthetic: class = shape + colour)
whose features the test extracts with the tiny random models; random features still carry
colour, so a head trained on them must clearly beat chance.
"""

from __future__ import annotations

import json

import pytest
import torch

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.extract.run import extract
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.data.synthetic import make_classification, make_sbir, make_segmentation
from vermouth_cache.train.common import RunOptions
from vermouth_cache.train.tasks import task_settings

RES, T = 64, 10


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    store = root / "store"
    base = dict(store=str(store), sd_model=str(tiny["sd"]), captioner=str(tiny["blip"]), resolution=RES, t=(T,),
                device="cpu", shard_size=8, progress=False, expert="resnet18", expert_model=str(tiny["resnet18"]),
                attn_maps="up")
    split = make_classification(root / "cls", n_classes=3, per_class=(8, 4, 4), size=64)
    for part in ("train", "val", "test"):
        extract(ExtractRequest(dataset=str(split), split=part, stages="down,mid", **base))
    sbir = make_sbir(root / "sbir", n_classes=12, photos_per_class=4, sketches_per_class=4, size=64)
    for tree in ("photo", "sketch"):
        extract(ExtractRequest(dataset=str(sbir / tree), stages="mid,up", **{**base, "attn_maps": None}))
    seg = make_segmentation(root / "seg", n_classes=3, n_images=8, size=64)
    for part in ("train", "val"):
        extract(ExtractRequest(dataset=str(seg), layout="generic", split=part, stages="mid,up", dtype="fp32",
                               **base))
    return {"root": root, "store": store, "split": split, "sbir": sbir, "seg": seg, "tiny": tiny}


def _opts(cache, out, **kw):
    return RunOptions(store=str(cache["store"]), out=str(cache["root"] / out), clip_model=str(cache["tiny"]["clip"]),
                      device="cpu", progress=False, **kw)


def _fewshot(cache, out, **settings):
    from vermouth_cache.train.tasks.fewshot import FewshotData, train_fewshot

    s = task_settings("fewshot", **{"t": T, "resolution": RES, "lr": 1e-3, "epochs": 15, "batch_size": 4, **settings})
    return train_fewshot(FewshotData(str(cache["split"]), shots=4, shot_seed=1), s, _opts(cache, out))


def test_fewshot_learns_and_records_the_run(cache):
    m = _fewshot(cache, "fs1")
    assert m["chance"] == pytest.approx(1 / 3)
    assert m["top1"] >= 0.75, m  # 12 test images, chance 1/3
    assert m["n"] == {"train": 12, "val": 12, "test": 12}  # 4 shots x 3 classes from the cached full train split
    run = cache["root"] / "fs1"
    for name in ("config.json", "metrics.json", "head.safetensors", "curve.png"):
        assert (run / name).stat().st_size > 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["settings"]["stages"] == "down,mid" and cfg["settings"]["expert"] == "resnet18"
    assert cfg["head"]["trainable_parameters"] > 0
    assert 8.0e6 < cfg["head"]["sd15_scale_parameters"] < 1.2e7
    saved = json.loads((run / "metrics.json").read_text())
    assert set(saved["entries"]["train"]) == {"features", "expert"}
    assert saved["history"]["loss"][0] > saved["history"]["loss"][-1]
    assert (run / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_fewshot_same_seed_same_metrics_and_checkpoint_round_trips(cache):
    from vermouth_cache.data.datasets import load_dataset
    from vermouth_cache.train.heads import TextClassifier
    from vermouth_cache.store.entries import Store
    from vermouth_cache.train.common import infer, loader_for
    from vermouth_cache.train.inputs import open_split
    from vermouth_cache.train.runs import load_head

    a = _fewshot(cache, "fs-a", epochs=3)
    b = _fewshot(cache, "fs-b", epochs=3)
    assert a == b
    from safetensors.torch import load_file

    wa, wb = load_file(cache["root"] / "fs-a" / "head.safetensors"), load_file(cache["root"] / "fs-b" / "head.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    model, cfg, _ = load_head(cache["root"] / "fs-a")
    s = task_settings("fewshot", **{k: v for k, v in cfg["settings"].items() if k not in ()})
    store = Store(cache["store"])
    test = open_split(store, load_dataset(cache["split"], split="test"), s)
    from vermouth_cache.extract.classtext import class_text_features

    text = torch.from_numpy(class_text_features(store, cfg["classnames"], cfg["templates"], str(cache["tiny"]["clip"]),
                                                proj=False))
    logits, _ = infer(torch.nn.Sequential(model, TextClassifier(text, cfg["temperature"])),
                      loader_for(test, s, _opts(cache, "unused"), shuffle=False))
    assert (logits.argmax(1).numpy() == test.labels).mean() == pytest.approx(a["top1"])


def test_mismatched_recipe_is_refused_naming_the_fields(cache):
    with pytest.raises(VermouthError, match=r"t \(cached 10, requested 200\)"):
        _fewshot(cache, "fs-bad", t=200)
    with pytest.raises(VermouthError, match=r"noise \(cached ddpm, requested none\)"):
        _fewshot(cache, "fs-bad2", noise="none")
    with pytest.raises(VermouthError, match="mid_block|up_blocks"):  # stages never extracted
        _fewshot(cache, "fs-bad3", stages="mid,up")
    assert not [p for p in ("fs-bad", "fs-bad2", "fs-bad3") if (cache["root"] / p).exists()]  # no empty runs


def test_sbir_retrieves_unseen_classes(cache):
    from vermouth_cache.train.tasks.sbir import SbirData, train_sbir

    s = task_settings("sbir", t=T, resolution=RES, noise="ddpm", lr=1e-3, epochs=15, batch_size=8,
                      temperature=0.1)
    m = train_sbir(SbirData(str(cache["sbir"]), unseen=str(cache["sbir"] / "unseen.txt")), s, _opts(cache, "sbir"))
    assert m["n"] == {"seen_photos": 24, "seen_sketches": 24, "unseen_photos": 24, "unseen_sketches": 24}
    assert m["random_ranking_mAP"] < 0.3
    assert m["mAP@all"] > m["random_ranking_mAP"] + 0.15, m  # measured: 0.46 against 0.24 (6 unseen classes)
    assert 0 <= m["P@100"] <= 1 and "mAP@200" in m and "P@200" in m


def test_seg_learns_and_evaluates_on_another_split(cache):
    from vermouth_cache.train.tasks.seg import SegData, SegSource, train_seg

    s = task_settings("seg", t=T, resolution=RES, lr=5e-3, iters=150, batch_size=4, eval_every=1000)
    src = lambda split: SegSource(str(cache["seg"]), "generic", split)  # noqa: E731
    m = train_seg(SegData(src("train"), (src("val"),)), s, _opts(cache, "seg"))
    (name, scores), = m["eval"].items()
    # 3 classes, predictions on an 8x8 grid of 64 px images; measured 0.58 (pixel accuracy 0.75), while
    # a constant prediction scores about 0.2
    assert scores["mIoU"] > 0.45, scores
    assert len(scores["per_class_IoU"]) == 3


def test_tune_norms_starts_from_the_cached_features_and_trains_the_norms(cache):
    from vermouth_cache.data.datasets import load_dataset
    from vermouth_cache.train.loader import CacheLoader
    from vermouth_cache.store.entries import Store
    from vermouth_cache.train.inputs import open_split
    from vermouth_cache.train.online import OnlineTaps

    s = task_settings("seg", t=T, resolution=RES)
    store = Store(cache["store"])
    split = open_split(store, load_dataset(cache["seg"], layout="generic", split="train"), s)
    online = OnlineTaps(str(cache["tiny"]["sd"]), split, torch.device("cpu"))
    fields = online.bind(store, split)
    cached = {n: f for n, f in split.fields.items() if not n.startswith("expert.")}
    batch = next(iter(CacheLoader({**fields, **cached}, split.indices[:4], 4)))
    with torch.no_grad():
        taps = online(batch)
    for name in cached:
        torch.testing.assert_close(taps[name], batch[name], rtol=1e-4, atol=1e-4)
    before = {k: v.clone() for k, v in online.norm_state().items()}
    assert len(before) > 0 and all(p.requires_grad for p in online.norm_parameters())
    assert not any(p.requires_grad for n, p in online.unet.named_parameters() if "norm" not in n and p.dim() > 1)

    from vermouth_cache.train.tasks.seg import SegData, SegSource, train_seg

    s2 = task_settings("seg", t=T, resolution=RES, lr=1e-3, iters=3, batch_size=4, tune_norms=True)
    opts = _opts(cache, "seg-norms", sd_model=str(cache["tiny"]["sd"]))
    train_seg(SegData(SegSource(str(cache["seg"]), "generic", "train")), s2, opts)
    from vermouth_cache.train.runs import load_head

    _, _, extra = load_head(cache["root"] / "seg-norms")
    assert set(extra) == set(before)
    assert any(not torch.equal(extra[k], before[k]) for k in before)
    with pytest.raises(VermouthError, match="--sd-model"):
        train_seg(SegData(SegSource(str(cache["seg"]), "generic", "train")), s2, _opts(cache, "seg-norms2"))


def _same_run(a, b) -> None:
    """Two run directories hold the same weights and the same metrics (config aside)."""
    from safetensors.torch import load_file

    wa, wb = load_file(a / "head.safetensors"), load_file(b / "head.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma == mb


def test_heads_sharing_a_pass_equal_heads_trained_alone(cache):
    """`sweep` trains heads that differ only in head settings on one pass over the features; each
    must come out as it would trained alone (sbir: photos+sketches; seg: one evaluation pass)."""
    from vermouth_cache.train.common import HeadJob
    from vermouth_cache.train.tasks.sbir import SbirData, train_sbir, train_sbir_heads
    from vermouth_cache.train.tasks.seg import SegData, SegSource, train_seg, train_seg_heads

    root = cache["root"]
    sb = SbirData(str(cache["sbir"]), unseen=str(cache["sbir"] / "unseen.txt"))
    base = dict(t=T, resolution=RES, noise="ddpm", epochs=2, batch_size=8, temperature=0.1)
    heads = [task_settings("sbir", lr=1e-3, **base), task_settings("sbir", head="linear", lr=3e-3, expert="none", **base)]
    train_sbir_heads(sb, [HeadJob(s, str(root / f"sb-pass{i}")) for i, s in enumerate(heads)], _opts(cache, "unused"))
    for i, s in enumerate(heads):
        train_sbir(sb, s, _opts(cache, f"sb-alone{i}"))
        _same_run(root / f"sb-pass{i}", root / f"sb-alone{i}")

    src = lambda split: SegSource(str(cache["seg"]), "generic", split)  # noqa: E731
    data = SegData(src("train"), (src("val"),))
    base = dict(t=T, resolution=RES, iters=6, batch_size=4)
    heads = [task_settings("seg", lr=5e-3, **base), task_settings("seg", stages="mid", attn_maps="none", lr=1e-3,
                                                                  temperature=0.1, **base)]
    train_seg_heads(data, [HeadJob(s, str(root / f"seg-pass{i}")) for i, s in enumerate(heads)], _opts(cache, "unused"))
    for i, s in enumerate(heads):
        train_seg(data, s, _opts(cache, f"seg-alone{i}"))
        _same_run(root / f"seg-pass{i}", root / f"seg-alone{i}")

    with pytest.raises(VermouthError, match="cannot share a pass: they differ in batch_size"):
        train_seg_heads(data, [HeadJob(heads[0], str(root / "x0")),
                               HeadJob(heads[1].with_(batch_size=2), str(root / "x1"))], _opts(cache, "unused"))


def test_a_diverging_head_fails_alone_and_its_pass_goes_on():
    from vermouth_cache.train.loop import Member, fit, fit_many

    torch.manual_seed(0)
    x = torch.randn(16, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5])

    class Batches:
        bar = None

        def __len__(self):
            return 4

        def set_epoch(self, epoch):
            pass

        def __iter__(self):
            for i in range(4):
                yield {"x": x[4 * i:4 * i + 4], "y": y[4 * i:4 * i + 4]}

    def member(poison: bool):
        torch.manual_seed(1)
        model = torch.nn.Linear(3, 1)
        calls = []

        def loss(b):
            calls.append(1)
            value = ((model(b["x"])[:, 0] - b["y"]) ** 2).mean()
            return value * float("nan") if poison and len(calls) == 3 else value
        return Member(model, list(model.parameters()), loss, s)

    s = task_settings("fewshot", lr=1e-2, epochs=3, batch_size=4)
    good, bad = member(False), member(True)
    res = fit_many([bad, good], Batches(), s)
    assert res[0].error == "loss became nan at step 2" and res[0].steps == 2
    assert res[1].error is None and res[1].steps == 12
    alone = member(False)
    fit(alone.model, alone.params, alone.loss_fn, Batches(), s)
    assert torch.equal(alone.model.weight, good.model.weight)
    with pytest.raises(VermouthError, match="training diverged: loss became nan"):
        b = member(True)
        fit(b.model, b.params, b.loss_fn, Batches(), s)


def test_fewshot_refuses_test_features_swapped_for_validation_ones(cache, tmp_path):
    """Issue 11 case 1: swapping the test split's feature chunks with the validation split's (same
    shapes, valid checksums) must stop training, not report a test top-1 measured on val images."""
    import shutil

    from vermouth_cache.core.errors import VermouthError
    from vermouth_cache.store.entries import Store

    store = tmp_path / "store"
    shutil.copytree(cache["store"], store)
    st = Store(store)
    by_split = {}
    for e in st.entries("features"):  # the classification splits' entries at the fixture's t (not seg's)
        source = st.dataset(e.manifest["about"]["dataset_record"])["source"]
        if source["spec"] == str(cache["split"]) and e.manifest["recipe"]["t"] == T:
            by_split.setdefault(source["split"], e)
    val, test = by_split["val"], by_split["test"]
    tap = "mid_block"
    a, b = (st.loc.path(e.chunk_key(tap, 0)) for e in (val, test))
    ba, bb = a.read_bytes(), b.read_bytes()
    assert len(ba) == len(bb) and ba != bb
    a.write_bytes(bb)
    b.write_bytes(ba)
    with pytest.raises(VermouthError, match=rf"array {tap} shard 0: the chunk is well formed but not the one"):
        _fewshot({**cache, "store": store, "root": tmp_path}, "swapped")
