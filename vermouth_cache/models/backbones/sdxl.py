"""Stable Diffusion XL: recognised, and refused in one line until a later file supports it.

An SDXL U-net is conditioned on two text encoders' states (concatenated, 2048 wide) plus added
text and time embeddings (`addition_embed_type: text_time`: the pooled second encoder's output and
the original size, crop and target size), has three down and three up blocks, and its VAE scales
latents by 0.13025. Supporting it means: `stages` from its own blocks, `text_states` running both
encoders, and the extractor passing `added_cond_kwargs` to the U-net.
"""

from __future__ import annotations

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.models.backbones.base import Backbone, PipelineConfigs
from vermouth_cache.models.backbones.sd1 import has_second_text_encoder


class SDXL(Backbone):
    name = "sdxl"
    family = "Stable Diffusion XL"
    version = "XL"
    supported = False

    def recognises(self, cfg: PipelineConfigs) -> bool:
        return has_second_text_encoder(cfg)

    def check(self, spec: str, cfg: PipelineConfigs, supported: str) -> None:
        raise VermouthError(f"SD model {spec!r} is an SDXL pipeline, which vermouth-cache does not support yet: "
                            f"{'; '.join(cfg.problems())}. {supported}")
