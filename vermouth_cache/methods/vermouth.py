"""Vermouth (the paper this tool reproduces): Stable Diffusion block outputs as a frozen backbone.

    latent       E(x).latent_dist.mean * scaling_factor (the U-net's own latent space)
    noise / t    a request's choice: DDPM forward noise at t (default t=200, seeded per sample),
                 DDIM inversion to t, or the clean latent; nothing fixed
    conditioning BLIP captions by default; null, random words, class names or one text as ablations
    taps         block outputs (after each block's sampler), default the mid and up blocks
    attention    per block: cross-attention probabilities averaged over heads and layers (77, h, w)
    merge        "stages": the official code's stage merges (train/pyramid.py MERGES)

Its recipes carry no "method" field: they were written before methods were declared, and keeping
them as they are keeps every Vermouth store's keys valid.
"""

from __future__ import annotations

from vermouth_cache.methods.base import BLOCK_OUTPUTS, SCALED, Method
from vermouth_cache.models.taps import PER_BLOCK

METHOD = Method(
    name="vermouth",
    summary="vermouth (SD block outputs at t, BLIP captions, the paper's U-head)",
    conditionings=("blip", "null", "random", "classname", "text"),
    latent=SCALED,
    taps=BLOCK_OUTPUTS,
    attention=PER_BLOCK,
    merge="stages",
    default_stages="mid,up",
    keyed=False,
)
