"""`train seg` on VPD's features: Semantic FPN over the training classes, scored by mmseg's slide
inference (windows cached with `extract --slide`, logits averaged, at each map's native size)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vermouth_cache.data.datasets import load_dataset
from vermouth_cache.data.seg import read_mask
from vermouth_cache.data.synthetic import make_segmentation
from vermouth_cache.data.views import slide_views
from vermouth_cache.extract.context_tables import make_table
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.extract.run import extract
from vermouth_cache.store.entries import Store
from vermouth_cache.train.common import RunOptions
from vermouth_cache.train.metrics import confusion_matrix, miou
from vermouth_cache.train.runs import load_head
from vermouth_cache.train.tasks import task_settings
from vermouth_cache.train.tasks.seg import SegData, SegSource, train_seg

RES = 64


def test_slide_windows_are_mmsegs():
    # ADE20K's typical 683x512 at short side 512: two windows, the second flush with the right edge
    assert [v.box for v in slide_views(683, 512, 512, 512)] == [(0, 0, 512, 512), (171, 0, 683, 512)]
    # a 2048-wide panorama: (2048 - 512 + 340) // 341 + 1 = 6 windows
    boxes = [v.box for v in slide_views(2048, 512, 512, 512)]
    assert len(boxes) == 6 and boxes[1] == (341, 0, 853, 512) and boxes[-1] == (1536, 0, 2048, 512)
    assert [v.box for v in slide_views(1000, 1500, 512, 512)][-1] == (0, 256, 512, 768)  # tall: 512 x 768


@pytest.fixture(scope="module")
def ade(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("segfpn")
    data = make_segmentation(root / "seg", n_classes=3, n_images=16, size=96)
    classes = load_dataset(data, layout="generic", split="train").classnames
    table = make_table(root / "classes.safetensors", str(tiny["sd"]), list(classes), ["a photo of a {}."])
    store = root / "store"
    common = dict(dataset=str(data), layout="generic", store=str(store), method="vpd", context_table=str(table),
                  resolution=RES, sd_model=str(tiny["sd"]), device="cpu", progress=False)
    extract(ExtractRequest(split="train", **common))
    extract(ExtractRequest(split="val", slide=True, **common))
    return {"data": data, "store": store}


def test_fpn_learns_and_slide_scores_are_independent(ade, tmp_path):
    s = task_settings("seg", method="vpd", t=1, noise="none", prompt="table", attn_maps="a32", expert="none",
                      resolution=RES, iters=150, eval_every=150, batch_size=8, head_width=0.25, lr=1e-3)
    data = SegData(SegSource(str(ade["data"]), "generic", "train"), (SegSource(str(ade["data"]), "generic", "val"),),
                   slide=True)
    out = tmp_path / "run"
    m = train_seg(data, s, RunOptions(store=str(ade["store"]), out=str(out), progress=False))
    val = load_dataset(ade["data"], layout="generic", split="val", slide=RES)
    score = m["eval"][val.name]
    # the trivial predictor: the most frequent training class everywhere (tiny random U-nets keep
    # little absolute colour after their group norms; measured ~0.26 against ~0.15)
    train_masks = [read_mask(x.mask, "identity", n_classes=3) for x in load_dataset(ade["data"], layout="generic",
                                                                                      split="train").samples]
    counts = np.bincount(np.concatenate([mk[mk != 255] for mk in train_masks]), minlength=3)
    const = np.zeros((3, 3), dtype=np.int64)
    for x in load_dataset(ade["data"], layout="generic", split="val").samples:
        mk = read_mask(x.mask, "identity", n_classes=3).astype(np.int64)
        const += confusion_matrix(np.full(mk.shape, counts.argmax()), mk, 3, ignore_index=255)
    assert score["mIoU"] > miou(const)["mIoU"] + 0.05, (score, miou(const))

    head, config, _ = load_head(out)
    assert config["slide"] is True and head.spec.kind == "vpd-fpn"
    feats = next(e for e in Store(str(ade["store"])).entries("features") if e.manifest["about"]["dataset"] == val.name)
    conf = np.zeros((3, 3), dtype=np.int64)
    with torch.no_grad():
        for i, x in enumerate(val.samples):  # one 64x64 window per 96x96 image at short side 64
            batch = {n: torch.from_numpy(feats.read(n, [i])).float() for n in feats.array_names()}
            logits = F.interpolate(head(batch), size=(RES, RES), mode="bilinear", align_corners=False)
            mask = read_mask(x.mask, "identity", n_classes=3)
            pred = F.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=False)[0].argmax(0).numpy()
            conf += confusion_matrix(pred, mask.astype(np.int64), 3, ignore_index=255)
    assert score["mIoU"] == pytest.approx(miou(conf)["mIoU"], abs=1e-9)


def test_seg_online_trains_the_adapter_with_vpds_multipliers(ade, tiny, tmp_path):
    from vermouth_cache.train.tasks import get_task

    assert get_task("seg").unet_lr_scale == {"default": 0.1, "norm": 1.0}  # VPD seg's mmcv custom keys
    s = task_settings("seg", method="vpd", t=1, noise="none", prompt="table", attn_maps="a32", expert="none",
                      resolution=RES, iters=4, eval_every=4, batch_size=4, head_width=0.125, lr=1e-3, adapter=True)
    data = SegData(SegSource(str(ade["data"]), "generic", "train"), (SegSource(str(ade["data"]), "generic", "val"),),
                   slide=True)
    m = train_seg(data, s, RunOptions(store=str(ade["store"]), out=str(tmp_path / "o"), sd_model=str(tiny["sd"]),
                                      progress=False))
    assert 0 <= next(iter(m["eval"].values()))["mIoU"] <= 1
    _, _, extra = load_head(tmp_path / "o")
    assert "adapter.gamma" in extra and not torch.allclose(extra["adapter.gamma"], torch.full((32,), 1e-4))


def test_seg_frozen_prompt_and_selecting_its_features_by_table_sha(ade, tiny, tmp_path):
    """--freeze-prompt-after on seg: the adapted table conditions a new cache of the training and
    slide-window sets; afterwards the store holds two tables' features, and `--context-table SHA`
    (a prefix, as the metrics and `ls` show it) picks one where a plain run is ambiguous."""
    from vermouth_cache.core.errors import VermouthError
    from vermouth_cache.data.tables import read_table

    s = task_settings("seg", "fast", method="vpd", resolution=RES, iters=4, batch_size=4, head_width=0.125, lr=1e-3)
    assert (s.t, s.noise, s.prompt, s.attn_maps, s.stages, s.expert) == (1, "none", "table", "a32", None, None)
    data = SegData(SegSource(str(ade["data"]), "generic", "train"), (SegSource(str(ade["data"]), "generic", "val"),),
                   slide=True)
    m = train_seg(data, s.with_(freeze_prompt_after=3), RunOptions(store=str(ade["store"]), out=str(tmp_path / "p"),
                                                                   sd_model=str(tiny["sd"]), progress=False))
    table = read_table(tmp_path / "p" / "adapted_table.safetensors")
    assert m["mode"] == "vpd-frozen-prompt (3 steps)" and m["adapted_table"] == table.sha256
    assert len(table.rows) == 3 and table.about["adapted_from"]
    with pytest.raises(VermouthError, match=r"features entries of .* match: .*add --context-table"):
        train_seg(data, s, RunOptions(store=str(ade["store"]), out=str(tmp_path / "a"), progress=False))
    picked = train_seg(data, s, RunOptions(store=str(ade["store"]), out=str(tmp_path / "b"), progress=False,
                                           select=(("table", table.sha256[:12]),)))
    assert picked["entries"]["train"]["features"] == m["entries"]["train"]["features"]
    with pytest.raises(VermouthError, match="no such table file, nor a sha256"):
        train_seg(data, s, RunOptions(store=str(ade["store"]), out=str(tmp_path / "c"), progress=False,
                                      select=(("table", "kitchen"),)))
