"""A new method is one declaration: registered, it extracts on the tiny models through the same
extractor, under keys of its own, sharing the artifacts its rules share with Vermouth.

`vermouth-null` is Vermouth with the null prompt and t fixed (a throwaway). `vpd-sketch` declares
what VPD needs (see VPD.md): the clean latent without the scale factor at t=1, taps on layers
inside blocks, and cross-attention maps averaged per resolution over the down and up layers; the
test checks each against a plain diffusers computation, with no change to the extractor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_images
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.extract.run import extract
from vermouth_cache.extract.selection import features_facts
from vermouth_cache.methods import METHODS, Method, method_named, register_method
from vermouth_cache.methods.base import LAYER_OUTPUTS, UNSCALED
from vermouth_cache.models.taps import ATTN_PREFIX, PER_BLOCK, AttentionMaps, run_taps
from vermouth_cache.store.entries import Store


@pytest.fixture
def registered():
    """register_method for the test's duration."""
    names = []

    def add(method: Method) -> Method:
        names.append(method.name)
        return register_method(method)

    yield add
    for name in names:
        METHODS.pop(name, None)


@pytest.fixture
def two(tmp_path):
    return make_images(tmp_path / "two", {"cat": 1, "dog": 1})


NULL_AT_50 = Method(name="vermouth-null", summary="vermouth-null (Vermouth, null prompt, t=50)",
                    conditionings=("null",), fixed={"prompt": "null", "t": (50,)})


def test_a_new_method_is_one_declaration(registered, request_for, two):
    registered(NULL_AT_50)
    vermouth = extract(request_for(two, prompt="null", t=(50,), stages="mid", dtype="fp32"))
    new = extract(request_for(two, method="vermouth-null", stages="mid", dtype="fp32"))
    feat = "features t=50"
    assert new.entries[feat] != vermouth.entries[feat]
    assert {k: new.entries[k] for k in ("captions", "text", "latents")} == \
        {k: vermouth.entries[k] for k in ("captions", "text", "latents")}  # shared rules, shared artifacts
    store = Store(request_for(two).store)
    ours, theirs = store.find("features", new.entries[feat]), store.find("features", vermouth.entries[feat])
    assert ours.manifest["recipe"]["method"] == "vermouth-null" and "method" not in theirs.manifest["recipe"]
    assert {k: v for k, v in ours.manifest["recipe"].items() if k != "method"} == theirs.manifest["recipe"]
    np.testing.assert_array_equal(ours.read("mid_block"), theirs.read("mid_block"))  # the same computation
    assert ours.manifest["about"]["method"] == "vermouth-null" and ours.manifest["about"]["merge"] == "stages"
    assert features_facts(store, ours)["method"] == "vermouth-null"
    assert features_facts(store, theirs)["method"] == "vermouth"  # a training query for Vermouth never picks ours
    with pytest.raises(VermouthError, match="method vermouth-null fixes --t to 50"):
        request_for(two, method="vermouth-null", t=(100,))
    with pytest.raises(VermouthError, match="method vermouth-null fixes --prompt to null"):
        request_for(two, method="vermouth-null", prompt="blip")


def test_methods_are_named_once_and_unknown_ones_refused(registered, request_for, two):
    registered(NULL_AT_50)
    with pytest.raises(VermouthError, match="already registered"):
        register_method(Method(name="vermouth-null", summary="another", conditionings=("blip",)))
    with pytest.raises(VermouthError, match=r"unknown method 'vdp' \(choose from vermouth, vpd, vermouth-null\)"):
        request_for(two, method="vdp")
    only_blip = registered(Method(name="blip-only", summary="blip only", conditionings=("blip",)))
    with pytest.raises(VermouthError, match="method blip-only takes no --prompt 'null' \\(it takes blip\\)"):
        request_for(two, method=only_blip.name, prompt="null")
    assert method_named("vermouth").keyed is False  # Vermouth's recipes predate methods


class PerResolutionMean(AttentionMaps):
    """VPD's maps: per size (1/2 and 1/4 of the latent), the mean over every cross-attention layer
    of that size in the down and up blocks (mid excluded), heads averaged."""

    name = "per-resolution mean"
    FACTORS = (2, 4)

    def taps(self, stages, with_cross_attention):
        return tuple(f"{ATTN_PREFIX}scale{f}" for f in self.FACTORS) if stages else ()

    def blocks(self, taps, with_cross_attention):
        return tuple(b for b in with_cross_attention if b != "mid_block")

    def aggregate(self, records, latent_hw):
        h, w = latent_hw
        layers = [m for maps in records.values() for m in maps]  # (B, HW, T) each
        out = {}
        for f in self.FACTORS:
            same = [m for m in layers if m.shape[1] == (h // f) * (w // f)]
            out[f"{ATTN_PREFIX}scale{f}"] = torch.stack(same).mean(0).transpose(1, 2).reshape(
                same[0].shape[0], same[0].shape[2], h // f, w // f)
        return out


LAYER_TAPS = ("up_blocks.3", "up_blocks.2.attentions.1", "up_blocks.1.attentions.1", "up_blocks.0.resnets.1")
VPD_SKETCH = Method(name="vpd-sketch", summary="vpd-sketch (clean unscaled latent at t=1, layer taps)",
                    conditionings=("text", "null"), latent=UNSCALED, taps=LAYER_OUTPUTS, attention=PerResolutionMean(),
                    merge="vpd-fpn", fixed={"t": (1,), "noise": "none", "taps": ",".join(LAYER_TAPS)})


def test_a_vpd_shaped_method_needs_no_change_to_the_extractor(registered, request_for, two, tiny):
    from diffusers import UNet2DConditionModel

    registered(VPD_SKETCH)
    text = "a photo of a dog"
    vermouth = extract(request_for(two, prompt=f"text:{text}", stages="mid"))
    rep = extract(request_for(two, method="vpd-sketch", prompt=f"text:{text}", attn_maps="down,up", dtype="fp32"))
    store = Store(request_for(two).store)
    feats = store.find("features", rep.entries["features t=1"])
    recipe = feats.manifest["recipe"]
    assert recipe["method"] == "vpd-sketch" and recipe["tap"] == "module output" and recipe["noise"] == {"mode": "none"}
    assert set(feats.array_names()) == set(LAYER_TAPS) | {"attn.scale2", "attn.scale4"}
    assert rep.entries["text"] == vermouth.entries["text"]  # the same text states serve both methods
    lat = store.find("latents", rep.entries["latents"])
    assert lat.manifest["recipe"]["latent"] == "latent_dist.mean" and rep.entries["latents"] != vermouth.entries["latents"]
    scale = 0.18215  # the tiny VAE's scaling_factor, as SD 1.5's
    np.testing.assert_allclose(lat.read("latent") * scale, store.find("latents", vermouth.entries["latents"]).read(
        "latent"), rtol=1e-6, atol=1e-7)

    # the layer taps and the maps against the U-net run by hand on the stored inputs
    unet = UNet2DConditionModel.from_pretrained(tiny["sd"], subfolder="unet").eval()
    z = torch.from_numpy(lat.read("latent", [1]))
    c = torch.from_numpy(store.find("text", rep.entries["text"]).read("cond", [1]))
    got = {}
    hooks = [unet.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: got.__setitem__(n, o[0] if isinstance(o, tuple) else o)) for n in LAYER_TAPS]
    with torch.no_grad():
        unet(z, torch.tensor([1]), encoder_hidden_states=c)
    for h in hooks:
        h.remove()
    for tap in LAYER_TAPS:
        want = got[tap].numpy()
        assert np.linalg.norm(feats.read(tap, [1]) - want) / np.linalg.norm(want) < 1e-5, tap
    blocks = [b for b in ("down_blocks.0", "down_blocks.1", "down_blocks.2", "up_blocks.1", "up_blocks.2", "up_blocks.3")]
    per_block = run_taps(unet, z, 1, c, [ATTN_PREFIX + b for b in blocks], attention=PER_BLOCK)
    n_layers = {b: sum(name.endswith("attn2") for name, _ in unet.get_submodule(b).named_modules()) for b in blocks}
    for f in (2, 4):
        side = z.shape[-1] // f
        those = [b for b in blocks if per_block[ATTN_PREFIX + b].shape[-1] == side]
        assert len(those) >= 2  # a down and an up block at each size: a layer-weighted mean, not a block mean
        want = sum(n_layers[b] * per_block[ATTN_PREFIX + b] for b in those) / sum(n_layers[b] for b in those)
        np.testing.assert_allclose(feats.read(f"attn.scale{f}", [1]), want.numpy(), rtol=1e-5, atol=1e-6)


def test_a_method_declared_as_architecture_md_writes_it(registered, request_for, two):
    """`fixed={"t": 1, ...}` (a single value) fixes a tuple field; a method without captions gets its
    first conditioning as the --prompt default instead of refusing BLIP the user never asked for."""
    registered(Method(name="plain-null", summary="plain-null", conditionings=("null", "text"),
                      fixed={"t": 1, "noise": "none"}))
    req = request_for(two, method="plain-null", stages="mid")
    assert req.t == (1,) and req.noise == "none" and req.prompt == "null"
    assert request_for(two, method="plain-null", stages="mid", t=(1,)).t == (1,)
    with pytest.raises(VermouthError, match="method plain-null fixes --t to 1"):
        request_for(two, method="plain-null", t=(2,))
    with pytest.raises(VermouthError, match="needs a text after the colon"):
        request_for(two, prompt="text:  ")
