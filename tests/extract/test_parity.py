"""Stored numbers equal an independent reference computed with plain diffusers/transformers calls.

The reference re-implements every step here, from the paper's definitions: PIL resize and crop,
pixels to [-1, 1], VAE mean times scaling factor, the documented noise rule, DDPMScheduler.add_noise,
CLIP text encoder, BLIP generate, and the U-net forward with forward hooks on the blocks.
Tolerance: relative L2 error < 1e-5 with --dtype fp32; within fp16 rounding with fp16.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from vermouth_cache.extract.run import extract
from vermouth_cache.store.entries import Store

T = 300
RES = 128


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class Reference:
    def __init__(self, tiny):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import BlipForConditionalGeneration, BlipProcessor, CLIPTextModel, CLIPTokenizer

        sd = str(tiny["sd"])
        self.unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet").eval()
        self.vae = AutoencoderKL.from_pretrained(sd, subfolder="vae").eval()
        self.te = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder").eval()
        self.tok = CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")
        self.sched = DDPMScheduler.from_pretrained(sd, subfolder="scheduler")
        self.proc = BlipProcessor.from_pretrained(str(tiny["blip"]))
        self.blip = BlipForConditionalGeneration.from_pretrained(str(tiny["blip"])).eval()

    def image(self, path):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        s = RES / min(w, h)
        img = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
        left, top = (img.width - RES) // 2, (img.height - RES) // 2
        return img.crop((left, top, left + RES, top + RES))

    @torch.no_grad()
    def caption(self, path):
        img = Image.open(path).convert("RGB")
        ids = self.blip.generate(**self.proc(images=img, return_tensors="pt"), min_new_tokens=5, max_new_tokens=20)
        return self.proc.decode(ids[0], skip_special_tokens=True).strip()

    @torch.no_grad()
    def cond(self, text, layer="final"):
        ids = self.tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = self.te(ids, output_hidden_states=True)
        if layer == "final":
            return out.last_hidden_state
        return getattr(self.te, "text_model", self.te).final_layer_norm(out.hidden_states[-2])

    @torch.no_grad()
    def latent(self, path):
        x = torch.from_numpy(np.array(self.image(path))).permute(2, 0, 1)[None].float() / 127.5 - 1
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    @staticmethod
    def noise(seed, sample_id, t, draw, shape):
        s = int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}:{t}:{draw}".encode()).digest()[:8], "little") % 2**63
        return torch.randn(shape, dtype=torch.float32, generator=torch.Generator("cpu").manual_seed(s))

    @torch.no_grad()
    def blocks(self, z, t, c):
        got = {}
        names = [f"down_blocks.{i}" for i in range(4)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(4)]
        hooks = [self.unet.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: got.__setitem__(n, o[0] if isinstance(o, tuple) else o)) for n in names]
        try:
            self.unet(z, torch.tensor([t]), encoder_hidden_states=c)
        finally:
            for h in hooks:
                h.remove()
        return got


@pytest.fixture(scope="module")
def ref(tiny):
    return Reference(tiny)


def _sample_paths(store_root, entry):
    record = Store(store_root).dataset(entry.manifest["about"]["dataset_record"])
    return record["ids"]


def test_fp32_ddpm_blip_matches_reference(ref, request_for, folder):
    req = request_for(folder, t=(T,), stages="down,mid,up", dtype="fp32")
    rep = extract(req)
    store = Store(req.store)
    feats = store.find("features", rep.entries[f"features t={T}"])
    captions = store.find("captions", rep.entries["captions"]).values("captions")
    ids = _sample_paths(req.store, feats)
    for i in (0, 2, 4):
        path = folder / ids[i]
        cap = ref.caption(path)
        assert captions[i] == cap and cap
        z0 = ref.latent(path)
        zt = ref.sched.add_noise(z0, ref.noise(0, ids[i], T, 0, z0.shape[1:])[None], torch.tensor([T]))
        blocks = ref.blocks(zt, T, ref.cond(cap))
        for tap, want in blocks.items():
            got = feats.read(tap, [i])
            assert got.shape == tuple(want.shape), tap
            assert rel_err(got, want.numpy()) < 1e-5, (tap, rel_err(got, want.numpy()))
    lat = store.find("latents", rep.entries["latents"]).read("latent", [1])
    assert rel_err(lat, ref.latent(folder / ids[1]).numpy()) < 1e-6


def test_fp16_within_rounding(ref, request_for, folder):
    rep = extract(request_for(folder, t=(T,), stages="mid", dtype="fp16", prompt="null"))
    store = Store(request_for(folder).store)
    feats = store.find("features", rep.entries[f"features t={T}"])
    ids = _sample_paths(store.root, feats)
    z0 = ref.latent(folder / ids[3])
    zt = ref.sched.add_noise(z0, ref.noise(0, ids[3], T, 0, z0.shape[1:])[None], torch.tensor([T]))
    want = ref.blocks(zt, T, ref.cond(""))["mid_block"].numpy()
    got = feats.read("mid_block", [3])
    assert got.dtype == np.float16
    # one fp16 rounding of a float32 value: at most half an ulp (2^-11 relative), plus subnormals
    assert np.all(np.abs(got.astype(np.float32) - want) <= np.abs(want) * 2**-11 + 2**-24)


def test_ddim_inversion_none_and_penultimate(ref, request_for, folder):
    steps = 4
    rep_inv = extract(request_for(folder, t=(T,), stages="up", dtype="fp32", prompt="text:a red dog",
                                  noise="ddim-inversion", inversion_steps=steps, text_layer="penultimate"))
    rep_none = extract(request_for(folder, t=(T,), stages="up", dtype="fp32", prompt="text:a red dog",
                                   noise="none", text_layer="penultimate"))
    store = Store(request_for(folder).store)
    inv = store.find("features", rep_inv.entries[f"features t={T}"])
    clean = store.find("features", rep_none.entries[f"features t={T}"])
    ids = _sample_paths(store.root, inv)
    c = ref.cond("a red dog", layer="penultimate")
    z0 = ref.latent(folder / ids[0])
    # DDIM inversion: evenly spaced 0 = s0 < ... < sK = T; eps predicted at the current step
    abar = ref.sched.alphas_cumprod.double()
    seq = [round(k * T / steps) for k in range(steps + 1)]
    z = z0
    with torch.no_grad():
        for prev, cur in zip(seq[:-1], seq[1:]):
            eps = ref.unet(z, torch.tensor([prev]), encoder_hidden_states=c).sample
            a0, a1 = float(abar[prev]), float(abar[cur])
            z = a1**0.5 * (z - (1 - a0) ** 0.5 * eps) / a0**0.5 + (1 - a1) ** 0.5 * eps
    want = ref.blocks(z, T, c)
    want_clean = ref.blocks(z0, T, c)
    for tap in ("up_blocks.0", "up_blocks.3"):
        assert rel_err(inv.read(tap, [0]), want[tap].numpy()) < 1e-5
        assert rel_err(clean.read(tap, [0]), want_clean[tap].numpy()) < 1e-5


def test_noise_draws_average(ref, request_for, folder):
    rep = extract(request_for(folder, t=(T,), stages="mid", dtype="fp32", prompt="null", noise_draws=3))
    store = Store(request_for(folder).store)
    feats = store.find("features", rep.entries[f"features t={T}"])
    ids = _sample_paths(store.root, feats)
    z0, c = ref.latent(folder / ids[1]), ref.cond("")
    want = sum(ref.blocks(ref.sched.add_noise(z0, ref.noise(0, ids[1], T, d, z0.shape[1:])[None], torch.tensor([T])),
                          T, c)["mid_block"] for d in range(3)) / 3
    assert rel_err(feats.read("mid_block", [1]), want.numpy()) < 1e-5


def test_attention_maps_match_reference(ref, request_for, folder):
    from diffusers.models.attention_processor import Attention

    rep = extract(request_for(folder, t=(T,), stages="mid", attn_maps="up,mid", dtype="fp32", prompt="text:a cat"))
    store = Store(request_for(folder).store)
    feats = store.find("features", rep.entries[f"features t={T}"])
    ids = _sample_paths(store.root, feats)
    assert {"attn.up_blocks.1", "attn.up_blocks.2", "attn.up_blocks.3", "attn.mid_block"} <= set(feats.array_names())
    assert "attn.up_blocks.0" not in feats.array_names()  # UpBlock2D has no cross-attention
    z0, c = ref.latent(folder / ids[2]), ref.cond("a cat")
    zt = ref.sched.add_noise(z0, ref.noise(0, ids[2], T, 0, z0.shape[1:])[None], torch.tensor([T]))
    probs = {}

    def capture(block):
        def pre(mod, args, kwargs):
            x, ctx = args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"]
            b, n, _ = x.shape
            q = mod.to_q(x).view(b, n, mod.heads, -1).transpose(1, 2)
            k = mod.to_k(ctx).view(b, ctx.shape[1], mod.heads, -1).transpose(1, 2)
            p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (B, heads, HW, 77)
            probs.setdefault(block, []).append(p.mean(1))
        return pre

    hooks = []
    for block in ("up_blocks.1", "up_blocks.3", "mid_block"):
        for name, m in ref.unet.get_submodule(block).named_modules():
            if name.endswith("attn2") and isinstance(m, Attention):
                hooks.append(m.register_forward_pre_hook(capture(block), with_kwargs=True))
    with torch.no_grad():
        ref.unet(zt, torch.tensor([T]), encoder_hidden_states=c)
    for h in hooks:
        h.remove()
    for block, maps in probs.items():
        avg = torch.stack(maps).mean(0)[0]  # (HW, 77)
        side = int(avg.shape[0] ** 0.5)
        want = avg.T.reshape(77, side, side).numpy()
        got = feats.read(f"attn.{block}", [2])[0]
        assert got.shape == want.shape
        assert rel_err(got, want) < 1e-5, block
        np.testing.assert_allclose(got.sum(0), 1.0, rtol=1e-4)  # probabilities over the 77 tokens


def test_features_identical_with_and_without_attention_maps(request_for, folder, tmp_path):
    a = extract(request_for(folder, t=(T,), stages="up", prompt="null", store=str(tmp_path / "a")))
    b = extract(request_for(folder, t=(T,), stages="up", prompt="null", attn_maps="up", store=str(tmp_path / "b")))
    fa = Store(tmp_path / "a").find("features", a.entries[f"features t={T}"])
    fb = Store(tmp_path / "b").find("features", b.entries[f"features t={T}"])
    assert fa.key == fb.key  # the maps are extra arrays of the same entry
    np.testing.assert_array_equal(fa.read("up_blocks.3"), fb.read("up_blocks.3"))


@pytest.mark.parametrize("name", ["resnet18", "dino", "dinov2"])
def test_expert_features_match_reference(name, ref, request_for, folder, tiny):
    from transformers import AutoModel

    rep = extract(request_for(folder, t=(T,), stages="mid", prompt="null", expert=name, expert_model=str(tiny[name]),
                              dtype="fp32"))
    store = Store(request_for(folder).store)
    entry = store.find("expert", rep.entries["expert"])
    ids = _sample_paths(store.root, entry)
    model = AutoModel.from_pretrained(str(tiny[name])).eval()
    import json

    cfg = json.loads((tiny[name] / "preprocessor_config.json").read_text())
    mean, std = torch.tensor(cfg["image_mean"]).view(1, 3, 1, 1), torch.tensor(cfg["image_std"]).view(1, 3, 1, 1)
    x = torch.from_numpy(np.array(ref.image(folder / ids[4]))).permute(2, 0, 1)[None].float() / 255
    x = (x - mean) / std
    with torch.no_grad():
        if name == "resnet18":
            want = model(pixel_values=x, output_hidden_states=True).hidden_states[1:5]
        else:
            kw = {"interpolate_pos_encoding": True} if name == "dino" else {}
            hs = model(pixel_values=x, output_hidden_states=True, **kw).hidden_states
            p, L = model.config.patch_size, len(hs) - 1
            g = RES // p
            want = [hs[k][:, 1:1 + g * g].transpose(1, 2).reshape(1, -1, g, g) for k in (L // 4, L // 2, 3 * L // 4, L)]
    for level, w in enumerate(want):
        got = entry.read(f"expert.level{level}", [4])
        assert got.shape == tuple(w.shape)
        assert rel_err(got, w.numpy()) < 1e-5, level
