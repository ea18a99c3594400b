"""Pyramid merges, head shapes and parameter counts."""

import pytest
import torch
import torch.nn.functional as F

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.train.heads import (SD15_SHAPES_256, HeadSpec, TextClassifier, VermouthHead, count_parameters,
                                  sd15_parameter_count)
from vermouth_cache.train.pyramid import attach, merge_stages

# SD 1.5 at 512 (PAPER.md section 2), channels shrunk 10x to keep the test light
SHAPES_512 = {"down_blocks.0": (32, 32), "down_blocks.1": (64, 16), "down_blocks.2": (128, 8),
              "down_blocks.3": (128, 8), "mid_block": (128, 8), "up_blocks.0": (128, 16),
              "up_blocks.1": (128, 32), "up_blocks.2": (64, 64), "up_blocks.3": (32, 64)}


def _taps(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(2, c, s, s, generator=g) for n, (c, s) in SHAPES_512.items()}


def _up(x, f=2):
    return F.interpolate(x, scale_factor=f, mode="bilinear", align_corners=False)


def _official(taps, stages):
    """PAPER.md section 2 / the official post_process, written out list by list."""
    down = [taps[f"down_blocks.{i}"] for i in range(4)]
    up = [taps[f"up_blocks.{i}"] for i in range(4)]
    mid = taps["mid_block"]
    if stages == "down":
        f = down[::-1]
        return [f[0]] + [_up(x) for x in f[1:]]
    if stages == "up":
        return [_up(x, 0.5) for x in up[:-1]] + [up[-1]]
    if stages == "mid":
        return [mid]
    if stages == "down,mid":
        f = (down + [mid])[::-1]
        f[2:] = [_up(x) for x in f[2:]]
        del f[1]
        return f
    if stages == "mid,up":
        return [mid, up[0], up[1], torch.cat([up[2], up[3]], 1)]
    f = down + [mid] + up
    return [(f[2] + f[3] + f[4]) / 3, torch.cat([f[1], f[5]], 1), torch.cat([f[0], f[6]], 1), torch.cat([f[7], f[8]], 1)]


@pytest.mark.parametrize("stages", ["down", "up", "mid", "down,mid", "mid,up", "down,mid,up"])
def test_merges_equal_the_official_post_process(stages):
    taps = _taps()
    ours = merge_stages(taps, stages, mid_size=8)
    ref = _official(taps, stages)
    assert [x.shape for x in ours] == [x.shape for x in ref]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    sizes = [x.shape[-1] for x in ours]
    assert sizes == [8, 16, 32, 64][:len(ours)]


def test_paper_channel_counts_at_sd_scale():
    taps = {n: torch.zeros(1, *s) for n, s in SD15_SHAPES_256.items()}
    assert [x.shape[1] for x in merge_stages(taps, "mid,up", 4)] == [1280, 1280, 1280, 960]
    assert [x.shape[1] for x in merge_stages(taps, "down,mid,up", 4)] == [1280, 1920, 1600, 960]
    assert [x.shape[1] for x in merge_stages(taps, "down,mid", 4)] == [1280, 1280, 640, 320]


def test_down_up_without_mid_is_refused():
    with pytest.raises(VermouthError, match="no pyramid merge"):
        merge_stages(_taps(), "down,up", 8)


def test_attention_and_expert_maps_join_the_right_levels():
    levels = [torch.zeros(1, 4, s, s) for s in (8, 16, 32, 64)]
    extras = {"attn.up_blocks.1": torch.ones(1, 77, 16, 16), "attn.up_blocks.3": torch.ones(1, 77, 64, 64),
              "expert.level0": torch.ones(1, 5, 128, 128), "expert.level3": torch.ones(1, 7, 16, 16)}
    out = attach(levels, extras)
    assert [x.shape[1] for x in out] == [4 + 7, 4 + 77, 4, 4 + 77 + 5]
    assert [x.shape[-1] for x in out] == [8, 16, 32, 64]


def _spec(kind, flow, stages="mid,up", attn=True, expert=True):
    taps = {n: (c, s, s) for n, (c, s) in SHAPES_512.items()}
    if attn:
        taps.update({"attn.up_blocks.1": (77, 16, 16), "attn.up_blocks.2": (77, 32, 32)})
    exp = {f"expert.level{i}": (8 * 2**i, 128 // 2**i, 128 // 2**i) for i in range(4)} if expert else {}
    return HeadSpec(kind, flow, stages, taps, exp)


@pytest.mark.parametrize("kind", ["uhead", "baseline", "linear"])
@pytest.mark.parametrize("flow", ["global", "dense"])
def test_head_output_shapes(kind, flow):
    torch.manual_seed(0)
    model = VermouthHead(_spec(kind, flow), out_dim=16)
    batch = {n: torch.randn(2, *s) for n, s in {**model.spec.tap_shapes, **model.spec.expert_shapes}.items()}
    v = model(batch)
    assert v.shape == ((2, 16) if flow == "global" else (2, 16, 64, 64))
    v.sum().backward()  # every input path reaches the output
    assert all(p.grad is not None for p in model.parameters())


def test_parameter_counts():
    # U-head at SD 1.5 scale (mid+up, 256 input, 768-d CLIP text) against the paper's 8.6 M
    n = sd15_parameter_count("uhead", "global", "mid,up")
    assert 8.0e6 < n < 9.2e6, n
    assert sd15_parameter_count("linear", "global", "mid,up") == (1280 * 3 + 960) * 768 + 768
    # the expert adapters add parameters; 1x1 convs C -> C/4 -> C per level
    adapters = sum(2 * c * (c // 4) for c in (64, 128, 256, 512))
    assert sd15_parameter_count("uhead", "global", "mid,up", expert=True) - n > adapters
    # a tiny head's count is what the modules hold
    model = VermouthHead(_spec("linear", "global", attn=False, expert=False), out_dim=16)
    assert count_parameters(model) == (128 * 3 + 96) * 16 + 16


def test_missing_taps_refused():
    spec = HeadSpec("uhead", "global", "down,mid", {"mid_block": (8, 4, 4)}, {})
    with pytest.raises(VermouthError, match="down_blocks"):
        VermouthHead(spec, 4)


def test_text_classifier_is_scaled_cosine():
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    clf = TextClassifier(text, temperature=0.5)
    logits = clf(torch.tensor([[3.0, 0.0], [1.0, 1.0]]))
    s = 2**-0.5
    torch.testing.assert_close(logits, torch.tensor([[2.0, 0.0], [s / 0.5, s / 0.5]]))
    dense = clf(torch.tensor([[3.0, 0.0], [1.0, 1.0]]).T.reshape(1, 2, 1, 2))
    torch.testing.assert_close(dense[0, :, 0, :].T, logits)


def test_spec_round_trips_through_json():
    spec = _spec("uhead", "dense")
    assert HeadSpec.from_json(spec.to_json()) == spec
