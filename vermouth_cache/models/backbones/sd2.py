"""Stable Diffusion 2.x (2.0, 2.1, base and 768-v): SD 1.x's U-net layout with another text encoder.

What differs from SD 1.x, as stabilityai/stable-diffusion-2-1 ships it, and how it is handled:

    U-net       same blocks as SD 1.x (so the same tap names); attention_head_dim a per-block list
                (5, 10, 20, 20 heads), linear projections in its transformers (`use_linear_projection`,
                the mark this file recognises), upcast attention; cross_attention_dim 1024
    text        OpenCLIP ViT-H converted to CLIPTextModel (1024 wide, gelu), already cut before its
                last layer: last_hidden_state IS the penultimate layer SD 2 was trained on, so
                `--text-layer final` is what SD 2 sees; its tokenizer pads with "!"
    scheduler   DDIM config; 768-v checkpoints predict v (`prediction_type: v_prediction`), which
                DDIM inversion reads (`noise.eps_and_x0`) and which keys the inverted features

Every number above is read from the configs by the `Backbone` defaults.
"""

from __future__ import annotations

from vermouth_cache.models.backbones.base import Backbone, PipelineConfigs
from vermouth_cache.models.backbones.sd1 import SD_STAGES, has_second_text_encoder


class SD2(Backbone):
    name = "sd2"
    version = "2.x"
    stages = SD_STAGES

    def recognises(self, cfg: PipelineConfigs) -> bool:
        return bool(cfg.unet.get("use_linear_projection", False)) and not has_second_text_encoder(cfg)
