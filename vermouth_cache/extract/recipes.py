"""The recipe of each artifact: exactly the facts its numbers depend on, and nothing else.

A recipe is hashed (canonical JSON) into its store key. Paths, batch size, shard size, device and
worker count are absent on purpose: they do not change a value (the device only within
floating-point tolerance, recorded per shard instead). What a method declares reaches the recipes
through its rules: the conditioning's prompt facts, the latent rule, the tap rule, and the
method's name on its features (`Method.recipe_tag`; none for Vermouth, whose keys predate methods).
"""

from __future__ import annotations

from vermouth_cache import SCHEMA_VERSION
from vermouth_cache.data.views import GEOMETRIES
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.methods import Method
from vermouth_cache.methods.base import LatentRule
from vermouth_cache.methods.conditioning import conditioning_of

RESIZE = "shorter-side-bicubic-then-center-crop"
PIXELS = "x/127.5-1"


def captions_recipe(req: ExtractRequest, dataset_identity: str, *, captioner_id: str | None,
                    labels_key: str | None) -> dict:
    prompt = conditioning_of(req.prompt).prompt_recipe(req, captioner_id=captioner_id, labels_key=labels_key)
    return {"kind": "captions", "schema": SCHEMA_VERSION, "dataset": dataset_identity, "prompt": prompt}


def text_recipe(captions_key: str, *, tokenizer_id: str, text_encoder_id: str, layer: str,
                tokens: int | None = None) -> dict:
    # tokens: only when a request sets it, so that the keys of the default (77) never changed
    return {**({"tokens": tokens} if tokens is not None else {}),
        "kind": "text",
        "schema": SCHEMA_VERSION,
        "captions": captions_key,
        "tokenizer": tokenizer_id,
        "text_encoder": text_encoder_id,
        "layer": layer,
        "dtype": "float32",
    }


def latents_recipe(dataset_identity: str, *, vae_id: str, resolution: int, rule: LatentRule, views: str | None = None) -> dict:
    return {
        "kind": "latents",
        "schema": SCHEMA_VERSION,
        "dataset": dataset_identity,
        "vae": vae_id,
        "resolution": resolution,
        "resize": GEOMETRIES[views] if views else RESIZE,
        "pixels": PIXELS,
        "latent": rule.recipe,
        "dtype": "float32",
    }


def features_recipe(req: ExtractRequest, method: Method, t: int, *, latents_key: str, text_key: str, unet_id: str,
                    schedule: dict) -> dict:
    noise = {"mode": req.noise}
    if req.noise == "ddpm":
        noise.update(seed=req.seed, draws=req.noise_draws, rule="sha256(seed:id:t:draw)->torch.randn")
    elif req.noise == "ddim-inversion":
        noise.update(steps=req.inversion_steps)
    return {
        "kind": "features",
        "schema": SCHEMA_VERSION,
        "latents": latents_key,
        "text": text_key,
        "unet": unet_id,
        "schedule": schedule,
        "noise": noise,
        "t": t,
        "tap": method.taps.recipe,
        "dtype": req.dtype,
        **_codec_tag(req),
        **method.recipe_tag(),
    }


def expert_recipe(req: ExtractRequest, dataset_identity: str, *, expert_id: str, image_stats, views: str | None = None) -> dict:
    return {
        "kind": "expert",
        "schema": SCHEMA_VERSION,
        "dataset": dataset_identity,
        "expert": req.expert,
        "model": expert_id,
        "resolution": req.resolution,
        "resize": GEOMETRIES[views] if views else RESIZE,
        "normalize": {"mean": list(image_stats[0]), "std": list(image_stats[1])},
        "dtype": req.dtype,
        **_codec_tag(req),
    }


def _codec_tag(req: ExtractRequest) -> dict:
    """The codec enters the key only when it is not raw, so that the keys of raw stores never changed."""
    return {"codec": req.codec} if req.codec != "raw" else {}
