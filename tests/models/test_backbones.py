"""SD 2.x and other U-nets: v-prediction DDIM inversion, SD 2-shaped parity, the scheduler in the
key, and pipelines this tool cannot run (SDXL, ...) refused before any work.

References are plain diffusers/transformers calls on the tiny models, loaded from disk the way a
user's hub id is: `DDPMScheduler.add_noise`, `DDIMInverseScheduler.step`, the text encoder's
last_hidden_state, the VAE mean, U-net forward hooks. Tolerance: relative L2 error < 1e-5 with
--dtype fp32 (float32 arithmetic in both; the remaining difference is float32 rounding, ~1e-7).
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import make_images
from vermouth_cache.cli.main import run
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.extract.run import extract
from vermouth_cache.store.entries import Store
from vermouth_cache.models.tiny import write_tiny_sd2
from vermouth_cache.models.tiny_sd import SD2_TEXT_HIDDEN

T = 200
STEPS = 4  # 0, 50, 100, 150, 200: a step of 50 = 1000 // 20, so DDIMInverseScheduler walks the same grid
TOL = 1e-5
BLOCKS = [f"down_blocks.{i}" for i in range(4)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(4)]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def two(tmp_path):
    """Two 96x80 images: enough for per-sample parity, half the U-net passes of `folder`."""
    return make_images(tmp_path / "two", {"cat": 1, "dog": 1})


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return write_tiny_sd2(tmp_path_factory.mktemp("sd2") / "sd2", seed=0)


def variant(src, dst, **scheduler_fields):
    """A copy of a pipeline directory whose scheduler config has `scheduler_fields` changed."""
    shutil.copytree(src, dst)
    path = dst / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(scheduler_fields)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return dst


class Ref:
    """The tiny pipeline through plain diffusers/transformers calls."""

    def __init__(self, sd):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.dir = sd
        self.unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet").eval()
        self.vae = AutoencoderKL.from_pretrained(sd, subfolder="vae").eval()
        self.te = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder").eval()
        self.tok = CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")
        self.sched = DDPMScheduler.from_pretrained(sd, subfolder="scheduler")

    @torch.no_grad()
    def cond(self, text):
        ids = self.tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return self.te(ids).last_hidden_state

    @torch.no_grad()
    def latent(self, path, res=128):
        from PIL import Image

        img = Image.open(path).convert("RGB")
        s = res / min(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
        left, top = (img.width - res) // 2, (img.height - res) // 2
        x = torch.from_numpy(np.array(img.crop((left, top, left + res, top + res)))).permute(2, 0, 1)[None]
        return self.vae.encode(x.float() / 127.5 - 1).latent_dist.mean * self.vae.config.scaling_factor

    @staticmethod
    def noise(seed, sample_id, t, shape):
        import hashlib

        s = int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}:{t}:0".encode()).digest()[:8], "little") % 2**63
        return torch.randn(shape, dtype=torch.float32, generator=torch.Generator("cpu").manual_seed(s))

    @torch.no_grad()
    def blocks(self, z, t, c):
        got = {}
        hooks = [self.unet.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: got.__setitem__(n, o[0] if isinstance(o, tuple) else o)) for n in BLOCKS]
        try:
            self.unet(z, torch.tensor([t]), encoder_hidden_states=c)
        finally:
            for h in hooks:
                h.remove()
        return got

    @torch.no_grad()
    def invert(self, z0, c, t, steps):
        """DDIM inversion with diffusers' DDIMInverseScheduler. Its step(o, s_k, z) reads o at
        s_k - 1000 // num_inference_steps = s_{k-1} (alphas_cumprod[s_{k-1}] converts o to eps and
        x0 by prediction_type, x0 not clipped) and returns sqrt(a_{s_k}) x0 + sqrt(1 - a_{s_k}) eps.
        With steps_offset = the step, set_timesteps(1000 // step) walks exactly s_1 < ... < s_K; the
        U-net is evaluated at s_{k-1}, the noise level of the sample it is given (diffusers'
        inversion pipelines evaluate it at s_k; vermouth-cache documents s_{k-1})."""
        from diffusers import DDIMInverseScheduler

        step = t // steps
        assert step * steps == t and 1000 % step == 0
        inv = DDIMInverseScheduler.from_pretrained(self.dir, subfolder="scheduler", clip_sample=False,
                                                   timestep_spacing="leading", steps_offset=step)
        inv.set_timesteps(1000 // step)
        targets = inv.timesteps[:steps].tolist()
        assert targets == [step * (k + 1) for k in range(steps)]
        z = z0
        for s in targets:
            out = self.unet(z, torch.tensor([s - step]), encoder_hidden_states=c).sample
            z = inv.step(out, s, z).prev_sample
        return z

    @torch.no_grad()
    def invert_as_if_epsilon(self, z0, c, t, steps):
        """The old, wrong inversion: the U-net's output used as epsilon whatever it predicts."""
        abar = self.sched.alphas_cumprod.double()
        seq = [round(k * t / steps) for k in range(steps + 1)]
        z = z0
        for prev, cur in zip(seq[:-1], seq[1:]):
            eps = self.unet(z, torch.tensor([prev]), encoder_hidden_states=c).sample
            a0, a1 = float(abar[prev]), float(abar[cur])
            z = a1**0.5 * (z - (1 - a0) ** 0.5 * eps) / a0**0.5 + (1 - a1) ** 0.5 * eps
        return z


@pytest.fixture(scope="module")
def ref2(sd2):
    return Ref(sd2)


def _ids(store, entry):
    return store.dataset(entry.manifest["about"]["dataset_record"])["ids"]


# ----------------------------------------------------------------------------- SD 2.x parity


def test_tiny_sd2_is_sd2_shaped(sd2, tiny):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd2)
    unet, te = pipe.unet.config, pipe.text_encoder.config
    assert isinstance(unet.attention_head_dim, list) and len(set(unet.attention_head_dim)) > 1
    assert unet.use_linear_projection and unet.upcast_attention
    assert unet.cross_attention_dim == te.hidden_size == SD2_TEXT_HIDDEN
    assert SD2_TEXT_HIDDEN != json.loads((tiny["sd"] / "unet" / "config.json").read_text())["cross_attention_dim"]
    assert te.hidden_act == "gelu" and pipe.tokenizer.pad_token == "!"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    again = write_tiny_sd2(sd2.parent / "again", seed=0)  # same seed, same bytes
    files = sorted(p.relative_to(sd2) for p in sd2.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((sd2 / f).read_bytes() == (again / f).read_bytes() for f in files)


def test_sd2_ddpm_and_none_match_reference(sd2, ref2, request_for, two):
    """fp32 features of the SD 2-shaped pipeline, DDPM noise and --noise none, equal a plain
    diffusers forward with hooks within relative L2 1e-5; the text condition (padded with "!")
    and the latents within 1e-6; cross-attention maps of the per-block head counts within 1e-5."""
    from diffusers.models.attention_processor import Attention

    text = "a red dog"
    rep = extract(request_for(two, sd_model=str(sd2), t=(T,), stages="down,mid,up", dtype="fp32",
                              prompt=f"text:{text}", attn_maps="up"))
    rep_none = extract(request_for(two, sd_model=str(sd2), t=(T,), stages="mid,up", dtype="fp32",
                                   prompt=f"text:{text}", noise="none"))
    store = Store(request_for(two).store)
    feats = store.find("features", rep.entries[f"features t={T}"])
    clean = store.find("features", rep_none.entries[f"features t={T}"])
    ids = _ids(store, feats)
    c = ref2.cond(text)
    assert rel_err(store.find("text", rep.entries["text"]).read("cond", [0]), c.numpy()) < 1e-6
    for i in (0, 1):
        z0 = ref2.latent(two / ids[i])
        assert rel_err(store.find("latents", rep.entries["latents"]).read("latent", [i]), z0.numpy()) < 1e-6
        zt = ref2.sched.add_noise(z0, ref2.noise(0, ids[i], T, z0.shape[1:])[None], torch.tensor([T]))
        for tap, want in ref2.blocks(zt, T, c).items():
            assert rel_err(feats.read(tap, [i]), want.numpy()) < TOL, tap
        for tap, want in ref2.blocks(z0, T, c).items():
            if tap in ("mid_block", "up_blocks.0", "up_blocks.3"):
                assert rel_err(clean.read(tap, [i]), want.numpy()) < TOL, tap

    probs = []

    def pre(mod, args, kwargs):
        x, ctx = args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        b, n, _ = x.shape
        q = mod.to_q(x).view(b, n, mod.heads, -1).transpose(1, 2)
        k = mod.to_k(ctx).view(b, ctx.shape[1], mod.heads, -1).transpose(1, 2)
        probs.append(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(1))

    z0 = ref2.latent(two / ids[1])
    zt = ref2.sched.add_noise(z0, ref2.noise(0, ids[1], T, z0.shape[1:])[None], torch.tensor([T]))
    attns = [m for name, m in ref2.unet.get_submodule("up_blocks.1").named_modules()
             if name.endswith("attn2") and isinstance(m, Attention)]
    assert attns and attns[0].heads == ref2.unet.config.attention_head_dim[::-1][1]  # up blocks reverse the list
    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in attns]
    with torch.no_grad():
        ref2.unet(zt, torch.tensor([T]), encoder_hidden_states=c)
    for h in hooks:
        h.remove()
    avg = torch.stack(probs).mean(0)[0]
    side = int(avg.shape[0] ** 0.5)
    assert rel_err(feats.read("attn.up_blocks.1", [1])[0], avg.T.reshape(77, side, side).numpy()) < TOL


# ----------------------------------------------------------------------------- DDIM inversion


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample", "epsilon"])
def test_ddim_inversion_matches_ddim_inverse_scheduler(prediction_type, sd2, request_for, two, tmp_path):
    """Stored fp32 features after --noise ddim-inversion equal hooks on the U-net at the latent
    diffusers' DDIMInverseScheduler reaches, within relative L2 1e-5, for every prediction type."""
    sd = sd2 if prediction_type == "v_prediction" else variant(sd2, tmp_path / "sd", prediction_type=prediction_type)
    ref = Ref(sd)
    text = "a small boat"
    rep = extract(request_for(two, sd_model=str(sd), t=(T,), stages="mid,up", dtype="fp32", prompt=f"text:{text}",
                              noise="ddim-inversion", inversion_steps=STEPS))
    store = Store(request_for(two).store)
    feats = store.find("features", rep.entries[f"features t={T}"])
    ids = _ids(store, feats)
    c = ref.cond(text)
    for i in (0, 1):
        z0 = ref.latent(two / ids[i])
        want = ref.blocks(ref.invert(z0, c, T, STEPS), T, c)
        for tap in ("mid_block", "up_blocks.1", "up_blocks.3"):
            assert rel_err(feats.read(tap, [i]), want[tap].numpy()) < TOL, (tap, rel_err(feats.read(tap, [i]), want[tap].numpy()))
        if prediction_type != "epsilon":  # the reference tells the old reading (output as epsilon) apart
            old = ref.blocks(ref.invert_as_if_epsilon(z0, c, T, STEPS), T, c)["up_blocks.3"]
            assert rel_err(old.numpy(), want["up_blocks.3"].numpy()) > 1e-2


def test_ddim_invert_latent_matches_ddim_inverse_scheduler(sd2, ref2):
    """The inverted latent itself (vermouth_cache.models.noise.ddim_invert on the scheduler the tool
    loads, U-net through the tool's call) against DDIMInverseScheduler: relative L2 < 1e-5."""
    from vermouth_cache.extract.compute import _noised
    from vermouth_cache.models.loading import Placement
    from vermouth_cache.models.pipeline import StableDiffusion

    sd = StableDiffusion(str(sd2), Placement(torch.device("cpu"), torch.float32))
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(1, 4, 16, 16, generator=g)
    c = ref2.cond("a tall tree")
    got = _noised(sd.unet, sd.scheduler, z0, c, ["x"], t=T, draw=0, noise="ddim-inversion", seed=0, steps=STEPS)
    want = ref2.invert(z0, c, T, STEPS)
    assert rel_err(got, want) < TOL


# ----------------------------------------------------------------------------- the key


def test_scheduler_fields_that_change_features_are_in_the_key(sd2, request_for, two, tmp_path):
    """prediction_type keys inverted features (not DDPM ones, which it cannot change); the beta
    schedule keys both; timestep_spacing / steps_offset / clip_sample, which no code path reads,
    leave the key, and the stored bytes, as they are."""
    def keys(sd, noise):
        kw = {"noise": noise, **({"inversion_steps": 2} if noise == "ddim-inversion" else {})}
        rep = extract(request_for(two, sd_model=str(sd), t=(T,), stages="mid", prompt="null",
                                  store=str(tmp_path / "store"), **kw))
        return rep.entries

    eps = variant(sd2, tmp_path / "eps", prediction_type="epsilon")
    zero_snr = variant(sd2, tmp_path / "zsnr", rescale_betas_zero_snr=True)
    spacing = variant(sd2, tmp_path / "spacing", timestep_spacing="trailing", steps_offset=0, clip_sample=True)
    feat = f"features t={T}"
    base_inv, base_ddpm = keys(sd2, "ddim-inversion"), keys(sd2, "ddpm")
    inv_eps = keys(eps, "ddim-inversion")
    assert inv_eps[feat] != base_inv[feat]
    assert {k: inv_eps[k] for k in ("captions", "text", "latents")} == \
        {k: base_inv[k] for k in ("captions", "text", "latents")}
    assert keys(eps, "ddpm")[feat] == base_ddpm[feat]
    assert keys(zero_snr, "ddpm")[feat] != base_ddpm[feat]
    assert keys(zero_snr, "ddim-inversion")[feat] != base_inv[feat]
    assert keys(spacing, "ddim-inversion")[feat] == base_inv[feat]
    manifest = Store(tmp_path / "store").find("features", base_inv[feat]).manifest["recipe"]["schedule"]
    assert manifest["prediction_type"] == "v_prediction" and manifest["rescale_betas_zero_snr"] is False


# ----------------------------------------------------------------------------- the backbone seam


def test_the_backbone_is_detected_from_the_configs(tiny, sd2, tmp_path):
    """SD 1.x and 2.x each claim their pipelines (and no other backbone does); what is
    family-specific is read through the backbone: latent scale, text layer, schedule facts."""
    from vermouth_cache.models.backbones import BACKBONES, detect_backbone
    from vermouth_cache.models.backbones.base import PipelineConfigs
    from vermouth_cache.models.loading import Placement
    from vermouth_cache.models.pipeline import StableDiffusion

    cpu = Placement(torch.device("cpu"), torch.float32)
    for path, name in ((tiny["sd"], "sd1"), (sd2, "sd2")):
        cfg = PipelineConfigs.read(path)
        assert [b.name for b in BACKBONES if b.recognises(cfg)] == [name]
        assert detect_backbone(str(path), path).name == name
        sd = StableDiffusion(str(path), cpu)
        assert sd.backbone.name == name and sd.latent_scale == 0.18215
        assert sd.text_states(["a dog", "a cat"], layer="final", batch=1).shape == (2, 77, sd.config("unet")[
            "cross_attention_dim"])
    sdxl = write_tiny_sdxl(tiny, tmp_path / "sdxl")
    assert [b.name for b in BACKBONES if b.recognises(PipelineConfigs.read(sdxl))] == ["sdxl"]
    assert StableDiffusion(str(sd2), cpu).schedule_recipe("ddim-inversion")["prediction_type"] == "v_prediction"


# ----------------------------------------------------------------------------- refusals


def _cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["vermouth-cache", *map(str, args)])
    capsys.readouterr()  # what building the models printed is not the command's output
    with pytest.raises(SystemExit) as exc:
        run()
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code, out.err


def _no_work(store):
    return not any((store / kind).exists() for kind in ("captions", "text", "latents", "features"))


def write_tiny_sdxl(tiny, d):
    """A tiny SDXL-shaped pipeline saved by StableDiffusionXLPipeline: two text encoders, a U-net
    with added text/time embeddings (addition_embed_type="text_time")."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    sd = str(tiny["sd"])
    te = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder")
    torch.manual_seed(0)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**te.config.to_dict(), "projection_dim": 32}))
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64)
    tok = CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(sd, subfolder="vae"), text_encoder=te, text_encoder_2=te2,
        tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
    pipe.save_pretrained(d, safe_serialization=True)
    return d


def test_sdxl_refused_before_any_work(monkeypatch, capsys, tiny, folder, tmp_path):
    sdxl = write_tiny_sdxl(tiny, tmp_path / "sdxl")
    store = tmp_path / "store"
    code, err = _cli(monkeypatch, capsys, "extract", folder, "--store", store, "--sd-model", sdxl, "--prompt", "null",
                     "--resolution", "128", "--device", "cpu", "--quiet", "--t", "100")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "is an SDXL pipeline" in err and "addition_embed_type='text_time'" in err and "text_encoder_2" in err
    assert "does not support yet" in err
    assert "supports Stable Diffusion 1.x/2.x pipelines" in err
    assert _no_work(store)


@pytest.mark.parametrize("unet_change,culprit", [
    ({"in_channels": 9}, "takes 9 input channels, not the VAE's 4"),
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
    ({"encoder_hid_dim": 32}, "encoder_hid_dim=32"),
    ({"cross_attention_dim": 1024}, "1024-wide text states, its text encoder gives 32"),
])
def test_unet_needing_other_inputs_refused_before_any_work(monkeypatch, capsys, tiny, folder, tmp_path,
                                                           unet_change, culprit):
    sd = tmp_path / "sd"
    shutil.copytree(tiny["sd"], sd)
    cfg_path = sd / "unet" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **unet_change}))
    store = tmp_path / "store"
    code, err = _cli(monkeypatch, capsys, "extract", folder, "--store", store, "--sd-model", sd, "--prompt", "null",
                     "--resolution", "128", "--device", "cpu", "--quiet")
    assert code == 1 and len(err.strip().splitlines()) == 1 and culprit in err, err
    assert "supports Stable Diffusion 1.x/2.x pipelines" in err
    assert _no_work(store)


def test_unsupported_schedule_refused_before_any_work(sd2, request_for, folder, tmp_path):
    flow = variant(sd2, tmp_path / "flow", prediction_type="flow_prediction")
    with pytest.raises(VermouthError, match="prediction_type 'flow_prediction' is not supported"):
        extract(request_for(folder, sd_model=str(flow), t=(T,), stages="mid", prompt="null", noise="ddim-inversion"))
    assert _no_work(tmp_path / "store")
    short = variant(sd2, tmp_path / "short", num_train_timesteps=500)
    with pytest.raises(VermouthError, match=r"timestep 600 is outside the SD model's schedule \(0-499\)"):
        extract(request_for(folder, sd_model=str(short), t=(600,), stages="mid", prompt="null"))
    assert _no_work(tmp_path / "store")


def test_taps_the_unet_lacks_refused_before_any_work(tiny, request_for, folder, tmp_path):
    """A U-net with three down and three up blocks and no mid block (configs only: nothing loads)."""
    sd = tmp_path / "sd"
    shutil.copytree(tiny["sd"], sd)
    cfg_path = sd / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(down_block_types=cfg["down_block_types"][1:], up_block_types=cfg["up_block_types"][:3],
               block_out_channels=cfg["block_out_channels"][1:], mid_block_type=None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(VermouthError, match=r"its U-net has no mid_block, up_blocks\.3 \(its blocks: down_blocks\.0, "
                                            r"down_blocks\.1, down_blocks\.2, up_blocks\.0, up_blocks\.1, up_blocks\.2\)"):
        extract(request_for(folder, sd_model=str(sd), t=(T,), stages="mid,up", prompt="null"))
    assert _no_work(tmp_path / "store")
