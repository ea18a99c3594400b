"""Stable Diffusion 1.x (1.4, 1.5 and their fine-tunes): the backbone Vermouth was published on.

What is SD 1.x-specific, as diffusers ships it (stable-diffusion-v1-5/stable-diffusion-v1-5):

    U-net       UNet2DConditionModel, 4 down blocks, a mid block, 4 up blocks; at a 512 input
                (latent 64) the block outputs are 320 ch at 32 (down_blocks.0), 640 at 16,
                1280 at 8 and 8 (down_blocks.2-3), mid_block 1280 at 8, then up_blocks.0-3:
                1280 at 16, 1280 at 32, 640 at 64, 320 at 64 (a block's output follows its sampler)
                attention_head_dim one number (8 heads), conv projections in its transformers
    text        CLIPTextModel (OpenAI CLIP ViT-L/14, 768 wide), CLIPTokenizer, 77 tokens;
                the U-net attends to last_hidden_state
    latents     AutoencoderKL, latent = posterior * 0.18215 (its config's scaling_factor)
    scheduler   PNDM config, scaled_linear betas 0.00085-0.012 over 1000 steps, epsilon prediction

The code paths are the `Backbone` defaults, which read every number above from the configs; this
file says how an SD 1.x pipeline is told apart and which blocks a request may name.
"""

from __future__ import annotations

from vermouth_cache.models.backbones.base import Backbone, PipelineConfigs

# The tap names requests are checked against before a pipeline is read (SD 2.x shares them).
SD_STAGES = {
    "down": ("down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3"),
    "mid": ("mid_block",),
    "up": ("up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3"),
}


def has_second_text_encoder(cfg: PipelineConfigs) -> bool:
    """SDXL's mark: a second text encoder, or the added text/time embeddings it feeds."""
    return "text_encoder_2" in cfg.components() or cfg.unet.get("addition_embed_type") == "text_time"


class SD1(Backbone):
    name = "sd1"
    version = "1.x"
    default_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    stages = SD_STAGES

    def recognises(self, cfg: PipelineConfigs) -> bool:
        # SD 2.x switched its transformers to linear projections; SD 1.x keeps 1x1 convolutions
        return not cfg.unet.get("use_linear_projection", False) and not has_second_text_encoder(cfg)
