"""The tiny models load through the real `from_pretrained` paths and are byte-deterministic."""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vermouth_cache.models.tiny import load_words, write_tiny_models

NAMES = {"sd", "blip", "resnet18", "dino", "dinov2", "clip"}
# Phrases transformers 5 (LOAD REPORT table) and diffusers use when checkpoint keys and
# model parameters disagree.
WEIGHT_WARNINGS = ("MISSING", "UNEXPECTED", "MISMATCH", "not used", "newly initialized", "not initialized")


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_models(tmp_path_factory.mktemp("tiny_a"), seed=0)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextmanager
def _weight_warnings():
    """Collect transformers/diffusers log records (their root loggers do not propagate to caplog)."""
    handler = _Collect()
    loggers = [logging.getLogger(n) for n in ("transformers", "diffusers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler.messages
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def _assert_clean(messages: list[str]) -> None:
    bad = [m for m in messages if any(w in m for w in WEIGHT_WARNINGS)]
    assert not bad, "weight-loading warnings:\n" + "\n".join(bad)


def _image(seed: int = 0, size: int = 128) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), mode="RGB")


# ----------------------------------------------------------------------------- (a) determinism


def test_same_seed_is_byte_identical_and_other_seed_differs(tiny, tmp_path_factory):
    assert set(tiny) == NAMES
    root_a = next(iter(tiny.values())).parent
    again = write_tiny_models(tmp_path_factory.mktemp("tiny_b"), seed=0)
    ha, hb = _tree_hashes(root_a), _tree_hashes(next(iter(again.values())).parent)
    assert ha == hb
    assert all(f"{n}/" in "".join(ha) for n in NAMES)

    other = write_tiny_models(tmp_path_factory.mktemp("tiny_c"), seed=1)
    hc = _tree_hashes(next(iter(other.values())).parent)
    assert hc.keys() == ha.keys()
    weights = [k for k in ha if k.endswith(".safetensors")]
    assert len(weights) == 8  # unet, vae, text_encoder, blip, resnet18, dino, dinov2, clip
    assert all(ha[k] != hc[k] for k in weights)
    # Only weights depend on the seed; configs and tokenizer files do not.
    assert all(ha[k] == hc[k] for k in ha if not k.endswith(".safetensors"))


def test_rewrite_replaces_directory(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_re")
    paths = write_tiny_models(out, seed=0)
    (paths["dino"] / "stale.bin").write_bytes(b"x")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    write_tiny_models(out, seed=0)
    assert not (paths["dino"] / "stale.bin").exists()
    # The per-model seeding does not disturb the caller's RNG stream.
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------- (b) loading


def test_sd_components_load_cleanly(tiny):
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    d = tiny["sd"]
    with _weight_warnings() as msgs:
        unet = UNet2DConditionModel.from_pretrained(d, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(d, subfolder="vae")
        te = CLIPTextModel.from_pretrained(d, subfolder="text_encoder")
        tok = CLIPTokenizer.from_pretrained(d, subfolder="tokenizer")
        ddpm = DDPMScheduler.from_pretrained(d, subfolder="scheduler")
        pipe = StableDiffusionPipeline.from_pretrained(d)
    _assert_clean(msgs)

    assert unet.config.block_out_channels == [32, 64, 64, 64]
    assert unet.config.cross_attention_dim == te.config.hidden_size == 32
    assert vae.config.scaling_factor == 0.18215
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    assert te.config.num_hidden_layers >= 3
    assert te.config.vocab_size == len(tok)
    assert (te.config.bos_token_id, te.config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert te.config.pad_token_id == tok.pad_token_id
    assert ddpm.config.clip_sample is False
    assert ddpm.config.beta_schedule == "scaled_linear"
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.vae_scale_factor == 8


def test_vae_downsamples_by_8(tiny):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny["sd"], subfolder="vae")
    with torch.no_grad():
        lat = vae.encode(torch.zeros(1, 3, 128, 128)).latent_dist.mean
    assert lat.shape == (1, 4, 16, 16)


def test_transformers_models_load_cleanly(tiny):
    from transformers import (
        AutoImageProcessor,
        AutoModel,
        BlipForConditionalGeneration,
        BlipProcessor,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        Dinov2Model,
        ResNetModel,
        ViTModel,
    )

    img = _image()
    with _weight_warnings() as msgs:
        resnet = AutoModel.from_pretrained(tiny["resnet18"])
        resnet_proc = AutoImageProcessor.from_pretrained(tiny["resnet18"])
        # As for facebook/dino-vitb16, whose checkpoint has no pooler.
        dino = AutoModel.from_pretrained(tiny["dino"], add_pooling_layer=False)
        dino_proc = AutoImageProcessor.from_pretrained(tiny["dino"])
        dinov2 = AutoModel.from_pretrained(tiny["dinov2"])
        dinov2_proc = AutoImageProcessor.from_pretrained(tiny["dinov2"])
        clip = CLIPTextModelWithProjection.from_pretrained(tiny["clip"])
        clip_tok = CLIPTokenizer.from_pretrained(tiny["clip"])
        blip = BlipForConditionalGeneration.from_pretrained(tiny["blip"])
        blip_proc = BlipProcessor.from_pretrained(tiny["blip"])
    _assert_clean(msgs)

    assert isinstance(resnet, ResNetModel) and isinstance(dino, ViTModel) and isinstance(dinov2, Dinov2Model)
    assert dino.pooler is None
    with torch.no_grad():
        px = resnet_proc(images=img, return_tensors="pt")["pixel_values"]
        assert px.shape == (1, 3, 64, 64)
        assert resnet(pixel_values=px).pooler_output.shape == (1, 128, 1, 1)

        px = dino_proc(images=img, return_tensors="pt")["pixel_values"]
        assert px.shape == (1, 3, 128, 128)
        assert dino(pixel_values=px).last_hidden_state.shape == (1, 1 + 64, 32)

        px = dinov2_proc(images=img, return_tensors="pt")["pixel_values"]
        assert px.shape == (1, 3, 126, 126)
        assert dinov2(pixel_values=px).last_hidden_state.shape == (1, 1 + 81, 32)

        ids = clip_tok(["a photo of a circle", "a photo of a square"], padding="max_length", return_tensors="pt")
        assert ids["input_ids"].shape == (2, 77)
        emb = clip(**ids).text_embeds
        assert emb.shape == (2, 16) and not torch.allclose(emb[0], emb[1])

    assert blip_proc.tokenizer.bos_token == "[DEC]"
    assert blip.config.text_config.bos_token_id == blip_proc.tokenizer.bos_token_id
    assert blip.config.text_config.sep_token_id == blip_proc.tokenizer.sep_token_id
    assert blip.config.text_config.pad_token_id == blip_proc.tokenizer.pad_token_id == 0


# ----------------------------------------------------------------------------- (c) tokenizer


def test_clip_tokenizer_roundtrip(tiny):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny["sd"], subfolder="tokenizer")
    assert tok.model_max_length == 77
    ids = tok("a photo of a dog", padding="max_length", max_length=77)["input_ids"]
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id
    assert tok.eos_token_id in ids
    # Caption words from the word list are single tokens.
    assert ids[1:7] == [ids[1], ids[2], ids[3], ids[1], ids[5], tok.eos_token_id]
    assert tok.convert_ids_to_tokens(ids[1:6]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "dog</w>"]
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a dog"
    # Words outside the list still encode (byte-level BPE has no unknown token) and round-trip.
    assert tok.decode(tok("Zyxt 42 photos!")["input_ids"], skip_special_tokens=True) == "zyxt 4 2 photos !"

    words = load_words()
    assert len(words) >= 400
    single = [w for w in words if len(tok.tokenize(w)) == 1]
    assert len(single) == len(words)


# ----------------------------------------------------------------------------- (d) BLIP captions


def test_blip_generates_word_captions_deterministically(tiny):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    proc = BlipProcessor.from_pretrained(tiny["blip"])
    model = BlipForConditionalGeneration.from_pretrained(tiny["blip"]).eval()
    vocab = set(load_words())
    images = [_image(1), _image(2)]

    def caption(**text):
        inputs = proc(images=images, return_tensors="pt", **text)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=10, min_new_tokens=5)
        return proc.batch_decode(out, skip_special_tokens=True)

    for text in ({}, {"text": ["a picture of"] * 2}):
        caps = caption(**text)
        assert caps == caption(**text)
        assert len(caps) == 2
        for c in caps:
            assert c.strip()
            assert set(c.split()) <= vocab, c
        if text:
            assert all(c.startswith("a picture of ") for c in caps), caps
            assert all(len(c.split()) >= 3 + 5 for c in caps), caps


# ----------------------------------------------------------------------------- (e) UNet blocks


def test_unet_forward_has_sd15_blocks(tiny):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny["sd"], subfolder="unet").eval()
    seen: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: seen.append(name))
        for name, m in unet.named_modules()
        if name in {f"down_blocks.{i}" for i in range(4)} | {"mid_block"} | {f"up_blocks.{i}" for i in range(4)}
    ]
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 77, 32))
    for h in hooks:
        h.remove()
    assert out.sample.shape == (1, 4, 16, 16)
    assert seen == [f"down_blocks.{i}" for i in range(4)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(4)]
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
