"""An SD pipeline directory: its backbone, detected from the configs before any work, and its
components, each loaded on first use and hashed by its files.

    sd = StableDiffusion("stable-diffusion-v1-5/stable-diffusion-v1-5", placement)
    sd.backbone            # SD1(): what is family-specific (models/backbones)
    sd.identity("unet")    # sha256 of the files from_pretrained reads
    sd.text_states(["a dog"], layer="final", batch=8)   # (1, 77, 768)
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.models.backbones import detect_backbone
from vermouth_cache.models.backbones.base import CONFIG_FILES
from vermouth_cache.models.loading import (HUB_ID, Placement, directory_identity, load_pretrained, resolve_model_dir,
                                            skeleton)
from vermouth_cache.models.taps import block_of

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class StableDiffusion:
    """One SD pipeline: its backbone and its lazily loaded components."""

    def __init__(self, spec: str, placement: Placement):
        self.spec = spec
        self.placement = placement
        self._identities: dict[str, str] = {}
        self.compile_layers: dict | None = None  # `extract --compile`: compiled.compile_layers' options
        if not Path(spec).expanduser().exists() and HUB_ID.match(spec):
            # a hub pipeline: its configs first, so an unsupported one (SDXL, ...) is refused
            # before gigabytes of weights are fetched
            detect_backbone(spec, resolve_model_dir(spec, role="SD model", hub_patterns=list(CONFIG_FILES)))
        self.dir = resolve_model_dir(
            spec,
            role="SD model",
            hub_patterns=["model_index.json"] + [f"{c}/*" for c in SD_COMPONENTS],
        )
        if not (self.dir / "model_index.json").is_file():
            raise VermouthError(f"SD model {spec!r} is not a diffusers pipeline directory (no model_index.json)")
        for comp in SD_COMPONENTS:
            if not (self.dir / comp).is_dir():
                raise VermouthError(f"SD model {spec!r} has no {comp}/ folder")
        self.backbone = detect_backbone(spec, self.dir)

    def identity(self, component: str) -> str:
        # a per-instance memo: functools.cache on a method would keep every instance (and its
        # loaded models) alive for the life of the process
        if component not in self._identities:
            self._identities[component] = directory_identity(self.dir / component)
        return self._identities[component]

    def config(self, component: str) -> dict:
        return json.loads((self.dir / component / "config.json").read_text())

    @property
    def condition_width(self) -> int:
        """D of the U-net's (N, L, D) conditions: its cross-attention width."""
        width = self.config("unet").get("cross_attention_dim")
        return width if isinstance(width, int) else width[0]

    @functools.cached_property
    def unet(self):
        from diffusers import UNet2DConditionModel

        unet = load_pretrained(UNet2DConditionModel, self.dir, self.placement, subfolder="unet")
        if self.compile_layers is not None:
            from vermouth_cache.models.compiled import compile_layers

            compile_layers(unet, **self.compile_layers)
        return unet

    @functools.cached_property
    def unet_skeleton(self):
        """The U-net built from its config on the meta device: its structure and output shapes,
        without reading (or allocating) a weight."""
        return skeleton(self.dir / "unet", "diffusers:UNet2DConditionModel")

    @functools.cached_property
    def vae(self):
        from diffusers import AutoencoderKL

        return load_pretrained(AutoencoderKL, self.dir, self.placement, subfolder="vae")

    @functools.cached_property
    def text_encoder(self):
        import transformers

        cls = getattr(transformers, self.backbone.text_encoder_class)
        return load_pretrained(cls, self.dir, self.placement, subfolder="text_encoder")

    @functools.cached_property
    def tokenizer(self):
        import transformers

        return load_pretrained(getattr(transformers, self.backbone.tokenizer_class), self.dir, subfolder="tokenizer")

    @functools.cached_property
    def scheduler(self):
        # SD 1.5 ships a PNDM config, SD 2.x a DDIM one: whatever the class, only the fields that
        # define alphas_cumprod (forward noising, inversion) and prediction_type (what the U-net's
        # output means, read by DDIM inversion) are used, and DDPMScheduler reads them all.
        from diffusers import DDPMScheduler

        return load_pretrained(DDPMScheduler, self.dir, subfolder="scheduler")

    def text_states(self, texts, *, layer: str, batch: int, max_length: int | None = None) -> np.ndarray:
        """(N, L, D) float32: the U-net's text conditions of `texts` (the backbone's encoder and
        layer), in encoder calls of `batch` texts; L = max_length tokens (default the tokenizer's)."""
        texts = list(texts)
        return np.concatenate([self.backbone.text_states(self.tokenizer, self.text_encoder, texts[i:i + batch], layer,
                                                         max_length=max_length)
                               for i in range(0, len(texts), batch)])

    @property
    def latent_scale(self) -> float:
        return self.backbone.latent_scale(self.vae.config)

    def schedule_recipe(self, noise: str) -> dict:
        """The scheduler facts a feature made under noise mode `noise` depends on (`Backbone.schedule_recipe`)."""
        return self.backbone.schedule_recipe(self.scheduler.config, noise, self.spec)

    @property
    def prediction_type(self) -> str:
        """What the U-net predicts (epsilon, v_prediction or sample), from the scheduler config."""
        return self.backbone.prediction_type(self.scheduler.config, self.spec)

    def check_taps(self, taps) -> None:
        """Every tap asked for exists in this U-net (a U-net with fewer blocks than SD's four
        down, one mid and four up ones, say), checked from its config before any work; a layer
        inside a block (`up_blocks.1.attentions.1`) from the skeleton."""
        have = self.backbone.blocks(self.config("unet"))
        missing = [tp for tp in taps if block_of(tp) not in have]
        if missing:
            listed = ", ".join(have) if have else "none"
            raise VermouthError(f"SD model {self.spec!r}: its U-net has no {', '.join(missing)} (its blocks: {listed}); "
                                f"choose --stages/--taps among those")
        layers = [tp for tp in taps if tp != block_of(tp)]
        if layers:
            names = {name for name, _ in self.unet_skeleton.named_modules()}
            unknown = [tp for tp in layers if tp not in names]
            if unknown:
                raise VermouthError(f"SD model {self.spec!r}: its U-net has no layer {', '.join(unknown)}")

    def check_timesteps(self, ts) -> None:
        n = self.backbone.timesteps(self.scheduler.config)
        bad = [t for t in ts if t >= n]
        if bad:
            raise VermouthError(f"timestep {bad[0]} is outside the SD model's schedule (0-{n - 1})")
