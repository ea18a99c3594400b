"""VPD's recipe (`--method vpd`) against plain diffusers/transformers calls on the tiny models.

The reference re-implements VPD.md section 1 by hand: PIL resize and crop, pixels to [-1, 1], the
VAE posterior mean WITHOUT the scaling factor, the U-net at t=1 on the clean latent conditioned on
the context table's rows, forward hooks on the four taps (ldm output_blocks 1, 4, 7, 11), and a
recording attention processor that averages softmax(QK^T/sqrt d) over heads and then over every
down and up cross-attention layer of one size. Tolerance: relative L2 error < 1e-5 with fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_images
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.tables import read_table, write_table
from vermouth_cache.extract.context_tables import class_embeddings, make_table
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.extract.run import extract
from vermouth_cache.methods.vpd import VPD_TAPS
from vermouth_cache.store.entries import Store

RES = 128


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def scene(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("vpd")
    data = make_images(root / "imgs", {"kitchen": 1, "office": 1})
    table = make_table(root / "classes.safetensors", str(tiny["sd"]), ["kitchen", "office", "bathroom"],
                       ["a photo of a {}.", "a picture of the {}."])
    return {"data": data, "table": table, "root": root}


def vpd_request(tiny, scene, store, **kw) -> ExtractRequest:
    base = dict(dataset=str(scene["data"]), store=str(store), method="vpd", sd_model=str(tiny["sd"]),
                context_table=str(scene["table"]), resolution=RES, device="cpu", progress=False, dtype="fp32")
    return ExtractRequest(**{**base, **kw})


class AttnRecorder:
    """A diffusers attention processor computing attention by hand and recording head-mean probabilities."""

    def __init__(self, sink: list):
        self.sink = sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, n, _ = hidden_states.shape
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        d = q.shape[-1] // attn.heads
        split = lambda x: x.view(b, -1, attn.heads, d).transpose(1, 2)  # noqa: E731 (b, heads, len, d)
        probs = torch.softmax(split(q) @ split(k).transpose(-1, -2) * d ** -0.5, dim=-1)
        if encoder_hidden_states is not None:
            self.sink.append(probs.mean(1))  # (b, n, tokens)
        out = (probs @ split(v)).transpose(1, 2).reshape(b, n, attn.heads * d)
        return attn.to_out[1](attn.to_out[0](out))


def reference(tiny, path, context: torch.Tensor, a64=False):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vae = AutoencoderKL.from_pretrained(tiny["sd"], subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(tiny["sd"], subfolder="unet").eval()
    img = Image.open(path).convert("RGB")
    s = RES / min(img.size)
    img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
    left, top = (img.width - RES) // 2, (img.height - RES) // 2
    img = img.crop((left, top, left + RES, top + RES))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1
    got, maps = {}, []
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean  # no scaling_factor: VPD's encode().mode()
        for name, module in unet.named_modules():
            if name.endswith("attn2") and not name.startswith("mid_block"):
                module.set_processor(AttnRecorder(maps))
        hooks = [unet.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: got.__setitem__(n, o[0] if isinstance(o, tuple) else getattr(o, "sample", o)))
            for n in VPD_TAPS]
        unet(z, torch.tensor([1]), encoder_hidden_states=context)
        for h in hooks:
            h.remove()
    side = z.shape[-1]
    for level in (0, 1, 2) if a64 else (1, 2):
        s = side >> level
        same = [m for m in maps if m.shape[1] == s * s]
        got[f"attn.level{level}"] = torch.stack(same).mean(0).transpose(1, 2).reshape(1, -1, s, s)
        got[f"layers{level}"] = len(same)
    return z, got


def test_vpd_features_and_maps_equal_a_plain_diffusers_forward(tiny, scene, tmp_path):
    req = vpd_request(tiny, scene, tmp_path / "s", attn_maps="a64")
    assert req.t == (1,) and req.noise == "none" and req.prompt == "table" and req.taps == ",".join(VPD_TAPS)
    rep = extract(req)
    store = Store(req.store)
    feats = store.find("features", rep.entries["features t=1"])
    assert feats.manifest["recipe"]["method"] == "vpd" and feats.manifest["recipe"]["noise"] == {"mode": "none"}
    table = read_table(scene["table"])
    ds_ids = sorted(p.relative_to(scene["data"]).as_posix() for p in scene["data"].rglob("*.png"))
    for i, sid in enumerate(ds_ids):
        z, want = reference(tiny, scene["data"] / sid, torch.from_numpy(table.values)[None], a64=True)
        assert rel_err(store.find("latents", rep.entries["latents"]).read("latent", [i])[0], z[0]) < 1e-6
        for tap in VPD_TAPS + ("attn.level0", "attn.level1", "attn.level2"):
            got = feats.read(tap, [i])
            assert got.shape == tuple(want[tap].shape), tap
            assert rel_err(got, want[tap].numpy()) < 1e-5, (sid, tap)
        assert feats.read("attn.level1", [i]).shape[1] == 3  # channels = context rows
        # a layer-weighted mean over down AND up layers (2 + 3 at SD's 32 and 16), not one block's
        assert want["layers1"] == 5 and want["layers2"] == 5


def test_a32_by_default_and_none_on_request(tiny, scene, tmp_path):
    rep = extract(vpd_request(tiny, scene, tmp_path / "s", dtype="fp16"))
    names = set(Store(str(tmp_path / "s")).find("features", rep.entries["features t=1"]).array_names())
    assert names == set(VPD_TAPS) | {"attn.level1", "attn.level2"}
    rep = extract(vpd_request(tiny, scene, tmp_path / "s2", dtype="fp16", attn_maps="none"))
    names = set(Store(str(tmp_path / "s2")).find("features", rep.entries["features t=1"]).array_names())
    assert names == set(VPD_TAPS)  # maps are arrays of the same entry: a store without them holds none


def test_the_class_row_conditions_each_image_and_the_table_bytes_key_it(tiny, scene, tmp_path):
    req = vpd_request(tiny, scene, tmp_path / "s", prompt="table-class", attn_maps="none")
    rep = extract(req)
    store = Store(req.store)
    cond = store.find("text", rep.entries["text"]).read("cond")
    table = read_table(scene["table"])
    assert cond.shape == (2, 1, table.values.shape[1])
    np.testing.assert_array_equal(cond[0, 0], table.values[0])  # kitchen
    np.testing.assert_array_equal(cond[1, 0], table.values[1])  # office
    assert store.find("captions", rep.entries["captions"]).manifest["about"]["uses_label"] is True

    # the same rows written again: the same bytes, the same keys; one value changed: new keys all the way
    same = write_table(tmp_path / "same.safetensors", table.values, table.rows, table.about)
    assert extract(req.with_(context_table=str(same))).entries == rep.entries
    edited = table.values.copy()
    edited[2, 0] += 1  # a row no image reads: the table's identity still changes
    other = write_table(tmp_path / "other.safetensors", edited, table.rows, table.about)
    rep2 = extract(req.with_(context_table=str(other)))
    assert rep2.entries["features t=1"] != rep.entries["features t=1"] and rep2.entries["latents"] == rep.entries["latents"]


def test_a_class_missing_from_the_table_is_one_line(tiny, scene, tmp_path):
    narrow = write_table(tmp_path / "narrow.safetensors", read_table(scene["table"]).values[:1], ["kitchen"], {})
    with pytest.raises(VermouthError, match=r"has no row 'office' \(sample office/"):
        extract(vpd_request(tiny, scene, tmp_path / "s", prompt="table-class", context_table=str(narrow)))


@pytest.mark.parametrize("kw, message", [
    ({"t": (200,)}, "method vpd fixes --t to 1"),
    ({"noise": "ddpm"}, "method vpd fixes --noise to none"),
    ({"prompt": "blip"}, "method vpd takes no --prompt 'blip'"),
    ({"context_table": None}, "--prompt table needs --context-table"),
    ({"attn_maps": "up"}, "unknown attention selector 'up' for vpd"),
    ({"text_tokens": 40}, "--text-tokens sets the length of tokenized texts"),
    ({"text_layer": "penultimate"}, "--text-layer picks a layer of the text encoder; --prompt table reads table rows"),
    ({"attn_maps": ""}, "--attn-maps is empty"),
])
def test_vpd_requests_are_checked_in_one_line(tiny, scene, tmp_path, kw, message):
    with pytest.raises(VermouthError, match=message.replace("(", r"\(").replace(")", r"\)")):
        vpd_request(tiny, scene, tmp_path / "s", **kw)


def test_sentences_condition_with_all_their_tokens_padded(tiny, tmp_path):
    """VPD refer: CLIP last_hidden_state of L tokens, padding included, no attention mask."""
    from transformers import CLIPTextModel, CLIPTokenizer

    data = make_images(tmp_path / "imgs", {"a": 2})
    ids = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    sentences = ["the red ball on the left", "a blue box"]
    (data / "m.csv").write_text("path,text\n" + "".join(f"{i},{s}\n" for i, s in zip(ids, sentences)))
    req = ExtractRequest(dataset=str(data / "m.csv"), store=str(tmp_path / "s"), method="vpd", sd_model=str(tiny["sd"]),
                         prompt="sentence", text_tokens=40, resolution=RES, device="cpu", progress=False)
    rep = extract(req)
    cond = Store(req.store).find("text", rep.entries["text"]).read("cond")
    tok = CLIPTokenizer.from_pretrained(tiny["sd"], subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(tiny["sd"], subfolder="text_encoder").eval()
    with torch.no_grad():
        want = te(tok(sentences, padding="max_length", max_length=40, truncation=True,
                      return_tensors="pt").input_ids).last_hidden_state
    assert cond.shape == (2, 40, want.shape[-1]) and rel_err(cond, want.numpy()) < 1e-6
    # the sentences are part of the key: another sentence, another text entry
    (data / "m.csv").write_text("path,text\n" + "".join(f"{i},{s} now\n" for i, s in zip(ids, sentences)))
    assert extract(req).entries["text"] != rep.entries["text"]


def test_class_embeddings_are_a_plain_mean_of_pooled_outputs(tiny):
    """VPD's dump_nyu_text_embeddings.py: pooler_output per template, mean over templates, no normalising."""
    from transformers import CLIPTextModel, CLIPTokenizer

    templates = ["a photo of a {}.", "there is a {} here"]
    values, about = class_embeddings(str(tiny["sd"]), ["study room", "kitchen"], templates)
    tok = CLIPTokenizer.from_pretrained(tiny["sd"], subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(tiny["sd"], subfolder="text_encoder").eval()
    for row, name in zip(values, ["study room", "kitchen"]):
        with torch.no_grad():
            pooled = [te(tok([t.format(name)], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids).pooler_output[0] for t in templates]
        np.testing.assert_allclose(row, torch.stack(pooled).mean(0).numpy(), rtol=1e-5, atol=1e-6)
    assert abs(np.linalg.norm(values[0]) - 1) > 1e-3 and about["templates"] == templates


def test_a_table_the_unet_cannot_attend_to_is_one_line(tiny, scene, tmp_path):
    wide = write_table(tmp_path / "wide.safetensors", np.ones((3, 48)), ["kitchen", "office", "bathroom"], {})
    with pytest.raises(VermouthError, match="rows 48 wide; this U-net attends to 32-wide"):
        extract(vpd_request(tiny, scene, tmp_path / "s", context_table=str(wide), attn_maps="none"))
    assert not list(Store(str(tmp_path / "s")).entries())  # refused before any entry (captions included) is made
    with pytest.raises(VermouthError, match="--text-tokens must be at least 2"):
        vpd_request(tiny, scene, tmp_path / "s", prompt="sentence", context_table=None, text_tokens=1)


def test_a_dry_run_sizes_table_conditions_by_their_rows(tiny, scene, tmp_path):
    """The text entry holds the table's C rows (table), one row (table-class) or L tokens (sentence)."""
    from vermouth_cache.extract.plan import TEXT
    from vermouth_cache.extract.survey import survey

    width = read_table(scene["table"]).values.shape[1]
    for prompt, tokens in (("table", len(read_table(scene["table"]).rows)), ("table-class", 1)):
        plans = survey(vpd_request(tiny, scene, tmp_path / prompt, prompt=prompt))
        text = next(p for p in plans if p.kind == "text")
        assert text.bytes_to_write == text.samples_to_compute[TEXT] * tokens * width * 4, prompt
        real = extract(vpd_request(tiny, scene, tmp_path / prompt, prompt=prompt, attn_maps="none"))
        stored = Store(str(tmp_path / prompt)).find("text", real.entries["text"]).read("cond")
        assert stored.shape[1:] == (tokens, width)
