#!/usr/bin/env python
"""FLOPs per image of an extraction on the real architectures, and the throughput floor they set.

    python benchmarks/flop_floor.py                      # SD 1.5 + BLIP-base at 256 and 512, ~5 s on a CPU
    python benchmarks/flop_floor.py --peak-tflops 989    # the floor on another GPU's dense bf16 peak

The models are built from their configs on the meta device (shapes only, no weights, no GPU) and run
under torch.utils.flop_counter.FlopCounterMode, which counts every matmul, convolution and attention
by its shapes (2 FLOPs per multiply-add):
  caption  BLIP-base (ViT-B/16 at 384 + BERT-base decoder): the vision tower once, then the decoder
           over a 20-token caption in one teacher-forced pass (what greedy decoding with a KV cache
           multiplies, without re-reading the prefix);
  text     the CLIP ViT-L/14 text tower over 77 tokens;
  vae      the VAE encoder at the resolution;
  unet     one U-net pass up to the last tap of --stages mid,up (`run_taps` stops there).
A first timestep runs all four; each further timestep runs the U-net only. The floor is the time the
FLOPs would take at the GPU's dense bf16/fp16 tensor-core peak (H200 SXM: 989 TFLOP/s), the bound
no implementation beats; `bench_extract.py --config cuda` reports its images/s as a share of it.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

H200_DENSE_BF16_TFLOPS = 989.0
CAPTION_TOKENS = 20  # BLIP's max_new_tokens by default; random weights never stop early
BENCH_TAPS = ("mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3")  # --stages mid,up


def sd15_unet_config() -> dict:
    return dict(
        sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
        mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768,
        attention_head_dim=8,
    )


def sd15_vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
    )


def clip_text_config(vocab_size: int = 49408, **ids) -> dict:
    """CLIP ViT-L/14's text tower (SD 1.5's text encoder)."""
    return dict(vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                projection_dim=768, **ids)


def blip_configs(vocab_size: int = 30524, **ids) -> tuple[dict, dict]:
    """BLIP-base captioning: (text decoder, vision tower ViT-B/16 at 384)."""
    text = dict(vocab_size=vocab_size, hidden_size=768, encoder_hidden_size=768, intermediate_size=3072,
                num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512, **ids)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=384, patch_size=16, initializer_range=0.02)
    return text, vision


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def flops_per_image(resolutions=(256, 512), taps=BENCH_TAPS) -> dict[int, dict[str, int]]:
    """{resolution: {"caption", "text", "vae", "unet": FLOPs of one image}} on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import BlipConfig, BlipForConditionalGeneration, CLIPTextConfig, CLIPTextModel

    from vermouth_cache.models.taps import run_taps

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_unet_config()).eval()
        vae = AutoencoderKL(**sd15_vae_config()).eval()
        clip = CLIPTextModel(CLIPTextConfig(**clip_text_config())).eval()
        text_cfg, vision_cfg = blip_configs()
        blip = BlipForConditionalGeneration(BlipConfig(text_config=text_cfg, vision_config=vision_cfg)).eval()
    meta = {"device": "meta"}
    tokens = torch.zeros(1, 77, dtype=torch.long, **meta)
    caption = torch.zeros(1, 1 + CAPTION_TOKENS, dtype=torch.long, **meta)  # [DEC] + the caption

    def blip_pass():
        image_embeds = blip.vision_model(pixel_values=torch.zeros(1, 3, 384, 384, **meta))[0]
        blip.text_decoder(input_ids=caption, encoder_hidden_states=image_embeds)

    shared = {"caption": _count(blip_pass), "text": _count(lambda: clip(input_ids=tokens))}
    out = {}
    for r in resolutions:
        latents, cond = torch.zeros(1, 4, r // 8, r // 8, **meta), torch.zeros(1, 77, 768, **meta)
        out[r] = {**shared,
                  "vae": _count(lambda: vae.encode(torch.zeros(1, 3, r, r, **meta)).latent_dist.mean),
                  "unet": _count(lambda: run_taps(unet, latents, 200, cond, taps))}
    return out


def floor(flops: dict[str, int], peak_tflops: float) -> dict:
    """Images/s at the peak for a first timestep (every model) and for each further one (the U-net)."""
    first = sum(flops.values())
    return {"first_timestep_flops": first, "further_timestep_flops": flops["unet"],
            "first_timestep_images_per_s": peak_tflops * 1e12 / first,
            "further_timestep_images_per_s": peak_tflops * 1e12 / flops["unet"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peak-tflops", type=float, default=H200_DENSE_BF16_TFLOPS,
                    help="the GPU's dense bf16/fp16 tensor-core peak in TFLOP/s (default: H200 SXM, 989)")
    ap.add_argument("--resolutions", default="256,512", help="comma-separated pixel sizes (default 256,512)")
    args = ap.parse_args()
    per = flops_per_image(tuple(int(r) for r in args.resolutions.split(",")))
    print(f"FLOPs per image (GFLOP), SD 1.5 + BLIP-base, --stages mid,up; floor at {args.peak_tflops:g} TFLOP/s")
    print(f"  {'px':>4} {'caption':>8} {'text':>6} {'vae':>7} {'unet':>7} {'first t':>8} {'floor img/s':>12} "
          f"{'more t img/s':>13}")
    blob = {}
    for r, f in per.items():
        fl = floor(f, args.peak_tflops)
        blob[r] = {"gflops": {k: v / 1e9 for k, v in f.items()}, **fl}
        print(f"  {r:>4} {f['caption'] / 1e9:>8.1f} {f['text'] / 1e9:>6.1f} {f['vae'] / 1e9:>7.1f} "
              f"{f['unet'] / 1e9:>7.1f} {fl['first_timestep_flops'] / 1e9:>8.1f} "
              f"{fl['first_timestep_images_per_s']:>12.0f} {fl['further_timestep_images_per_s']:>13.0f}")
    print(json.dumps({"peak_tflops": args.peak_tflops, "per_resolution": blob}, indent=1))


if __name__ == "__main__":
    main()
