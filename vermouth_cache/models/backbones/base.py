"""The backbone seam: what one family of diffusion pipelines (SD 1.x, SD 2.x, ...) is to this tool.

A backbone is recognised from a pipeline directory's configs alone (`recognises`), so a pipeline
this tool cannot run is refused before any weight is read (`check`). Everything family-specific
that a feature depends on goes through it: the U-net's tap names, the latent scaling, the text
encoder and tokenizer and which of their layers conditions the U-net, and the scheduler facts a
feature can depend on. Recipes never name the backbone: its facts reach the keys through the
model identities and the scheduler fields (`schedule_recipe`), so a key says what was computed.

To add one, write `backbones/<name>.py` with a `Backbone` subclass whose `recognises` excludes the
others (detection refuses a pipeline two of them claim) and import it in `backbones/__init__.py`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vermouth_cache.core.errors import VermouthError

# Scheduler fields that define alphas_cumprod (DDPMScheduler.__init__); with prediction_type, the
# only scheduler facts a feature can depend on.
SCHEDULE_FIELDS = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "trained_betas",
                   "rescale_betas_zero_snr")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TEXT_LAYERS = ("final", "penultimate")
# U-net conditionings besides the text states and the timestep: each needs inputs this tool never makes
EXTRA_CONDITIONS = ("addition_embed_type", "encoder_hid_dim", "encoder_hid_dim_type", "class_embed_type",
                    "num_class_embeds")
EXTRA_COMPONENTS = ("text_encoder_2", "tokenizer_2", "image_encoder", "image_normalizer", "image_noising_scheduler",
                    "low_res_scheduler", "prior", "depth_estimator")
CONFIG_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True)
class PipelineConfigs:
    """The configs of a diffusers pipeline directory that detection reads; {} where a file is missing."""
    index: dict
    unet: dict
    vae: dict
    text_encoder: dict

    @classmethod
    def read(cls, directory: Path) -> "PipelineConfigs":
        return cls(*(_json(directory / name) for name in CONFIG_FILES))

    def components(self) -> list[str]:
        """The pipeline's components beyond one text encoder, U-net and VAE (model_index.json)."""
        return [k for k, v in self.index.items()
                if k in EXTRA_COMPONENTS and isinstance(v, list) and v and v[0] is not None]

    def problems(self) -> list[str]:
        """Why a U-net here needs inputs other than the latent, the timestep and one CLIP text
        encoder's states (added text/time embeddings, class or image embeddings, extra input
        channels, a text width it does not attend to); empty when it needs none."""
        unet, reasons = self.unet, []
        extra = self.components()
        if extra:
            reasons.append("it has " + ", ".join(extra))
        if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
            reasons.append(f"its U-net is a {unet['_class_name']}")
        conds = [f"{k}={unet[k]!r}" for k in EXTRA_CONDITIONS if unet.get(k) is not None]
        if conds:
            reasons.append("its U-net needs added conditions (" + ", ".join(conds) + ")")
        vae_channels = self.vae.get("latent_channels", 4)
        if unet and unet.get("in_channels", 4) != vae_channels:
            reasons.append(f"its U-net takes {unet.get('in_channels', 4)} input channels, not the VAE's {vae_channels}")
        text_width = self.text_encoder.get("hidden_size")
        cross = unet.get("cross_attention_dim")
        cross = set(cross) if isinstance(cross, list) else {cross}
        if text_width is not None and unet and cross != {text_width} and "text_encoder_2" not in extra:
            reasons.append(f"its U-net attends to {'/'.join(map(str, sorted(cross, key=str)))}-wide text states, "
                           f"its text encoder gives {text_width}")
        return reasons


def unet_blocks(config: dict) -> tuple[str, ...]:
    """The block names a diffusers UNet2DConditionModel of this config has, in execution order."""
    return (tuple(f"down_blocks.{i}" for i in range(len(config.get("down_block_types", ()))))
            + (("mid_block",) if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None else ())
            + tuple(f"up_blocks.{i}" for i in range(len(config.get("up_block_types", ())))))


class Backbone:
    """A family of text-conditioned latent-diffusion pipelines, declared by a subclass.

    The defaults are those of the diffusers Stable Diffusion pipelines: a UNet2DConditionModel,
    an AutoencoderKL whose config gives the latent scaling, one CLIP text encoder and tokenizer, a
    DDPM-family scheduler config."""

    name: str  # short id, e.g. "sd1"
    family = "Stable Diffusion"
    version: str  # e.g. "1.x": said in refusals, "supports Stable Diffusion 1.x/2.x pipelines"
    default_model: str | None = None  # the hub id `extract --sd-model` defaults to, if this is the default
    supported = True
    text_encoder_class = "CLIPTextModel"
    tokenizer_class = "CLIPTokenizer"
    # the tap names of its U-net by stage, for requests checked before a pipeline is read
    stages: dict[str, tuple[str, ...]] = {}

    def recognises(self, cfg: PipelineConfigs) -> bool:
        """Whether a pipeline with these configs is of this family (exclusive of the others)."""
        raise NotImplementedError

    def check(self, spec: str, cfg: PipelineConfigs, supported: str) -> None:
        """Refuse, in one line, a pipeline of this family that the tool cannot run."""
        problems = cfg.problems()
        if problems:
            raise VermouthError(f"SD model {spec!r} is not a pipeline this tool can run: {'; '.join(problems)}. "
                                f"{supported}")

    # -- the U-net
    def blocks(self, unet_config: dict) -> tuple[str, ...]:
        return unet_blocks(unet_config)

    # -- latents
    def latent_scale(self, vae_config) -> float:
        """The factor the diffusion model's latents carry (the VAE config's scaling_factor)."""
        return float(vae_config.get("scaling_factor", 0.18215))  # AutoencoderKL's default

    # -- text
    def text_states(self, tokenizer, encoder, texts: Sequence[str], layer: str, *,
                    max_length: int | None = None) -> np.ndarray:
        """(N, L, D) float32 U-net conditions: L = max_length, default the tokenizer's model_max_length
        (77 for CLIP); padded to L, no attention mask (as SD and VPD call it).
        final = last_hidden_state (as SD 1.5 was trained; SD 2's converted OpenCLIP encoder is
        already cut before its last layer); penultimate = final_layer_norm(hidden_states[-2])
        (diffusers' clip_skip=1)."""
        device = next(encoder.parameters()).device
        if max_length is not None and max_length > tokenizer.model_max_length:
            raise VermouthError(f"--text-tokens {max_length} exceeds the text encoder's {tokenizer.model_max_length}")
        ids = tokenizer(list(texts), padding="max_length", max_length=max_length or tokenizer.model_max_length,
                        truncation=True,
                        return_tensors="pt").input_ids.to(device)
        with torch.inference_mode():
            res = encoder(ids, output_hidden_states=layer == "penultimate")
            h = res.last_hidden_state if layer == "final" else _final_norm(encoder)(res.hidden_states[-2])
        return h.float().cpu().numpy()

    # -- the scheduler
    def schedule_recipe(self, scheduler_config, noise: str, spec: str) -> dict:
        """The scheduler fields that can change a feature under noise mode `noise`: those that
        define alphas_cumprod, plus prediction_type when DDIM inversion reads the U-net's output.
        (timestep_spacing, steps_offset, clip_sample, thresholding, variance_type: never used, as
        the inversion builds its own timesteps and never clips its x0.)"""
        recipe = {k: scheduler_config[k] for k in SCHEDULE_FIELDS if k in scheduler_config}
        if noise == "ddim-inversion":
            recipe["prediction_type"] = self.prediction_type(scheduler_config, spec)
        return recipe

    def prediction_type(self, scheduler_config, spec: str) -> str:
        """What the U-net predicts (epsilon, v_prediction or sample), from the scheduler config."""
        kind = scheduler_config.get("prediction_type", "epsilon")
        if kind not in PREDICTION_TYPES:
            raise VermouthError(f"SD model {spec!r}: scheduler prediction_type {kind!r} is not supported by "
                                f"--noise ddim-inversion (supported: {', '.join(PREDICTION_TYPES)})")
        return kind

    def timesteps(self, scheduler_config) -> int:
        """How many training timesteps the schedule has (t runs 0 to this minus 1)."""
        return int(scheduler_config["num_train_timesteps"])


def _final_norm(enc):
    """CLIP's final LayerNorm: transformers 5 puts it on the model, 4 on `.text_model`."""
    return getattr(enc, "text_model", enc).final_layer_norm
