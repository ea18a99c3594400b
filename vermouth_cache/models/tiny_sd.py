"""The tiny Stable Diffusion pipelines (SD 1.5- and SD 2.1-shaped) and the tiny class-prompt CLIP.

Same block structure as the real U-nets (so block names and feature taps match), tiny widths.
Tokenizer files are written by hand in the layout the real hub repos use (vocab.json +
merges.txt) rather than by `save_pretrained`: transformers 5 would otherwise write only its own
tokenizer.json, and a hub-style directory exercises the conversion path real users hit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from vermouth_cache.models.tiny_vocab import CLIP_BOS, CLIP_EOS, SEED_OFFSETS, dump_json

CLIP_MAX_LENGTH = 77
CLIP_HIDDEN = 32  # also the UNet's cross_attention_dim: the text states are the UNet's context
SD2_TEXT_HIDDEN = 48  # SD 2.x's 1024 scaled down; differs from the SD 1.5 tiny model's 32 on purpose


def _write_clip_tokenizer(d: Path, vocab: dict[str, int], merges: list[tuple[str, str]], *,
                          pad_token: str = CLIP_EOS) -> None:
    # The four files the SD 1.5 / OpenAI CLIP repos ship; "#version" header as OpenAI's merges.txt.
    # SD 2.x's OpenCLIP tokenizer pads with "!" instead of <|endoftext|>.
    dump_json(d / "vocab.json", vocab)
    (d / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    dump_json(
        d / "special_tokens_map.json",
        {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": pad_token, "unk_token": CLIP_EOS},
    )
    dump_json(
        d / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "bos_token": CLIP_BOS,
            "do_lower_case": True,
            "eos_token": CLIP_EOS,
            "errors": "replace",
            "model_max_length": CLIP_MAX_LENGTH,
            "pad_token": pad_token,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": CLIP_EOS,
        },
    )


def _clip_text_config(vocab: dict[str, int], projection_dim: int):
    from transformers import CLIPTextConfig

    # Three layers so "penultimate hidden state" (clip skip) differs from the last one.
    # Token ids follow the tokenizer (the real SD config's 0/1/2 would select the legacy
    # argmax pooling; matching ids keep pooling on the true first <|endoftext|>).
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=projection_dim,
        bos_token_id=vocab[CLIP_BOS],
        eos_token_id=vocab[CLIP_EOS],
        pad_token_id=vocab[CLIP_EOS],
    )


# ----------------------------------------------------------------------------- Stable Diffusion


def _tiny_unet(**width):
    """SD's exact block layout (so block names and feature taps match the real U-net), with the
    widths cut: 32/64/64/64 channels, 8 norm groups; `width` sets the text width and heads."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        norm_num_groups=8,
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        act_fn="silu",
        **width,
    )


def _save_pipeline(d: Path, **parts) -> None:
    """An SD pipeline directory in diffusers' on-disk format (safetensors), no safety checker."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(d, safe_serialization=True)


def _tiny_vae():
    """Four encoder blocks = three downsamplings = factor 8, so 128 px images give 16x16 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.18215,
    )


def write_sd(d: Path, seed: int, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    from diffusers import PNDMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed + SEED_OFFSETS["unet"])
    unet = _tiny_unet(cross_attention_dim=CLIP_HIDDEN,
                      attention_head_dim=4)  # diffusers reads this as the number of heads, as SD 1.5's "8" is
    torch.manual_seed(seed + SEED_OFFSETS["vae"])
    vae = _tiny_vae()

    torch.manual_seed(seed + SEED_OFFSETS["text_encoder"])
    text_encoder = CLIPTextModel(_clip_text_config(vocab, projection_dim=CLIP_HIDDEN))

    tok_dir = d / "tokenizer"
    tok_dir.mkdir()
    _write_clip_tokenizer(tok_dir, vocab, merges)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        set_alpha_to_one=False,
        skip_prk_steps=True,
    )
    _save_pipeline(d, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)

    # save_pretrained rewrote the tokenizer in transformers 5's own layout; put back the
    # hub layout so loading goes through vocab.json + merges.txt like runwayml's repo.
    shutil.rmtree(tok_dir)
    tok_dir.mkdir()
    _write_clip_tokenizer(tok_dir, vocab, merges)

    # SD 1.5's scheduler_config.json carries "clip_sample": false although PNDM has no such
    # argument: it matters when another scheduler (DDPM/DDIM default to clipping) is loaded
    # from this config, so keep it like the real file does.
    sched_cfg = d / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched_cfg.read_text())
    cfg["clip_sample"] = False
    dump_json(sched_cfg, cfg)



def write_sd2(d: Path, seed: int, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    from diffusers import DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed + SEED_OFFSETS["sd2_unet"])
    unet = _tiny_unet(cross_attention_dim=SD2_TEXT_HIDDEN,
                      attention_head_dim=(2, 4, 8, 8),  # heads per block, as SD 2's [5, 10, 20, 20]
                      use_linear_projection=True, upcast_attention=True)
    torch.manual_seed(seed + SEED_OFFSETS["sd2_vae"])
    vae = _tiny_vae()

    torch.manual_seed(seed + SEED_OFFSETS["sd2_text_encoder"])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=SD2_TEXT_HIDDEN,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu",  # OpenCLIP ViT-H; OpenAI CLIP (SD 1.5) uses quick_gelu
        projection_dim=SD2_TEXT_HIDDEN,
        bos_token_id=vocab[CLIP_BOS],
        eos_token_id=vocab[CLIP_EOS],
        pad_token_id=vocab["!"],
    ))

    tok_dir = d / "tokenizer"
    tok_dir.mkdir()
    _write_clip_tokenizer(tok_dir, vocab, merges, pad_token="!")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    # stabilityai/stable-diffusion-2-1's scheduler_config.json
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    _save_pipeline(d, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    shutil.rmtree(tok_dir)  # back to the hub layout, as for SD 1.5
    tok_dir.mkdir()
    _write_clip_tokenizer(tok_dir, vocab, merges, pad_token="!")



def write_clip(d: Path, seed: int, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed + SEED_OFFSETS["clip"])
    CLIPTextModelWithProjection(_clip_text_config(vocab, projection_dim=16)).save_pretrained(
        d, safe_serialization=True
    )
    _write_clip_tokenizer(d, vocab, merges)

