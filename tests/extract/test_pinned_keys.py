"""Vermouth's recipes and keys, pinned: the method and backbone seams must not move a single key.

The recipes below were read from the store of these extractions made by the code before the seams
(commit 33c8a65), with each model and dataset identity (a file hash, which moves with the library
versions that wrote the tiny models) replaced by a <placeholder> and each upstream key by the
name of its entry. `test_pinned_recipes_hash_to_the_keys_of_before` fills them with that commit's
identities and checks the keys it wrote; `test_vermouth_extraction_makes_the_pinned_recipes` runs
the extractions now and checks every recipe and key against the pinned ones, filled with today's
identities.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vermouth_cache.core.hashing import recipe_key
from vermouth_cache.extract.run import extract
from vermouth_cache.models.loading import Captioner, Expert
from vermouth_cache.models.pipeline import StableDiffusion
from vermouth_cache.store.entries import Store

SCHEDULE = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
            "rescale_betas_zero_snr": False, "trained_betas": None}
DDPM = {"mode": "ddpm", "rule": "sha256(seed:id:t:draw)->torch.randn"}


def captions(prompt: dict) -> dict:
    return {"dataset": "<dataset>", "kind": "captions", "prompt": prompt, "schema": 2}


def text(run: str, layer: str = "final") -> dict:
    return {"captions": f"<captions:{run}>", "dtype": "float32", "kind": "text", "layer": layer, "schema": 2,
            "text_encoder": "<text_encoder>", "tokenizer": "<tokenizer>"}


def features(run: str, t: int, noise: dict, dtype: str = "fp16", schedule: dict = SCHEDULE) -> dict:
    return {"dtype": dtype, "kind": "features", "latents": "<latents>", "noise": noise, "schedule": schedule,
            "schema": 2, "t": t, "tap": "block output", "text": f"<text:{run}>", "unet": "<unet>"}


# run name -> the ExtractRequest options (beside the shared ones in `_extract_all`)
RUNS = {
    "blip_ddpm": dict(t=(100, 200), stages="mid,up", attn_maps="up", prompt="blip", expert="resnet18"),
    "null_none": dict(t=(50,), stages="down,mid", prompt="null", noise="none", dtype="fp32"),
    "random_inv": dict(t=(200,), taps="up_blocks.1", prompt="random", noise="ddim-inversion", inversion_steps=2,
                       text_layer="penultimate"),
    "classname_draws": dict(t=(300,), stages="up", prompt="classname", noise_draws=2, seed=3, dtype="bf16"),
    "text": dict(t=(10,), stages="mid", prompt="text:a red dog", caption_prefix="x", attn_maps="down,mid"),
}

# upstream entries first: a recipe refers to the entries before it by <name>
RECIPES = {
    "captions:blip_ddpm": captions({"captioner": "<captioner>", "decoding": "greedy", "max_new_tokens": 20,
                                    "min_new_tokens": 5, "mode": "blip", "prefix": ""}),
    "captions:classname_draws": captions({"labels": "<labels>", "mode": "classname", "template": "a photo of a {}."}),
    "captions:null_none": captions({"mode": "null"}),
    "captions:random_inv": captions({"mode": "random", "n_words": 8, "seed": 0, "words": "data/words.txt"}),
    "captions:text": captions({"mode": "text", "text": "a red dog"}),
    "text:blip_ddpm": text("blip_ddpm"),
    "text:classname_draws": text("classname_draws"),
    "text:null_none": text("null_none"),
    "text:random_inv": text("random_inv", "penultimate"),
    "text:text": text("text"),
    "latents": {"dataset": "<dataset>", "dtype": "float32", "kind": "latents", "latent": "latent_dist.mean*scaling_factor",
                "pixels": "x/127.5-1", "resize": "shorter-side-bicubic-then-center-crop", "resolution": 128,
                "schema": 2, "vae": "<vae>"},
    "features:blip_ddpm:100": features("blip_ddpm", 100, {**DDPM, "draws": 1, "seed": 0}),
    "features:blip_ddpm:200": features("blip_ddpm", 200, {**DDPM, "draws": 1, "seed": 0}),
    "features:classname_draws:300": features("classname_draws", 300, {**DDPM, "draws": 2, "seed": 3}, "bf16"),
    "features:null_none:50": features("null_none", 50, {"mode": "none"}, "fp32"),
    "features:random_inv:200": features("random_inv", 200, {"mode": "ddim-inversion", "steps": 2},
                                        schedule={**SCHEDULE, "prediction_type": "epsilon"}),
    "features:text:10": features("text", 10, {**DDPM, "draws": 1, "seed": 0}),
    "expert:blip_ddpm": {"dataset": "<dataset>", "dtype": "fp16", "expert": "resnet18", "kind": "expert",
                         "model": "<resnet18>", "normalize": {"mean": [0.485, 0.456, 0.406],
                                                              "std": [0.229, 0.224, 0.225]},
                         "resize": "shorter-side-bicubic-then-center-crop", "resolution": 128, "schema": 2},
}

# what commit 33c8a65 wrote, with the tiny models of torch 2.13 / diffusers 0.42.1 / transformers 5.24
BEFORE_IDS = {"captioner": "dbc8a6f996a8a296b8a928f93466d5f4", "resnet18": "897696e8260d96396fcd1cc9eb507579",
              "text_encoder": "ab642f4596154780584247b7fdc46a4b", "tokenizer": "7e4536704ac76913a8ce9be68a15c165",
              "unet": "bc5b6646c1c0fc0a55131f68d76bf3ee", "vae": "63c3f8b71ba82e95dda53ecc0f5159df",
              "dataset": "76391094eaeb9c52ab5924ebcfc372676c89530255cb62e2550606074347ace2",
              "labels": "73729c9f44f568d1"}
BEFORE_KEYS = {
    "captions:blip_ddpm": "722d82ba2ac964a5", "captions:classname_draws": "ecf36d001e7e292e",
    "captions:null_none": "6f3a8ec15f324a4e", "captions:random_inv": "a8eedb36ec0c0597",
    "captions:text": "7207a7821df49031", "text:blip_ddpm": "a937923f5e0e586d", "text:classname_draws": "8dd105372a20623f",
    "text:null_none": "8ce4dd7a0fb66249", "text:random_inv": "3e368e53816f6f3a", "text:text": "a53680ac62c6dbb0",
    "latents": "f291c23e128e0f3a", "features:blip_ddpm:100": "b13eb190bb0faaf8",
    "features:blip_ddpm:200": "4ffc4c9a1de1d0e2", "features:classname_draws:300": "c19d2880ccec164b",
    "features:null_none:50": "4c133a9dfc2e6651", "features:random_inv:200": "30022e6111c1317e",
    "features:text:10": "f032d6db78006872", "expert:blip_ddpm": "67a7083b6ed21eec",
}


def filled(ids: dict) -> tuple[dict[str, dict], dict[str, str]]:
    """The pinned recipes with identities and upstream keys in place of the placeholders, and their keys."""
    recipes, keys = {}, {}

    def fill(value):
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, str) and value.startswith("<") and value.endswith(">"):
            name = value[1:-1]
            return ids[name] if name in ids else keys[name]
        return value

    for name, template in RECIPES.items():
        recipes[name] = fill(template)
        keys[name] = recipe_key(recipes[name])
    return recipes, keys


def test_pinned_recipes_hash_to_the_keys_of_before():
    assert filled(BEFORE_IDS)[1] == BEFORE_KEYS


def _extract_all(tiny, tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for name, count in {"cat": 2, "dog": 1}.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(root / name / f"{i:02d}.png")
    from vermouth_cache.extract.request import ExtractRequest

    base = dict(dataset=str(root), store=str(tmp_path / "store"), sd_model=str(tiny["sd"]),
                captioner=str(tiny["blip"]), resolution=128, device="cpu", shard_size=2, batch_size=2,
                progress=False, cpu_threads=1)
    reports = {}
    for run, kw in RUNS.items():
        extra = {"expert_model": str(tiny["resnet18"])} if kw.get("expert") else {}
        reports[run] = extract(ExtractRequest(**base, **kw, **extra))
    return reports


def test_vermouth_extraction_makes_the_pinned_recipes(tiny, tmp_path):
    reports = _extract_all(tiny, tmp_path)
    store = Store(tmp_path / "store")
    sd = StableDiffusion(str(tiny["sd"]), None)
    ids = {c: sd.identity(c) for c in ("unet", "vae", "text_encoder", "tokenizer")}
    ids["captioner"] = Captioner(str(tiny["blip"]), None).identity
    ids["resnet18"] = Expert("resnet18", str(tiny["resnet18"]), None).identity
    ids["dataset"] = reports["text"].dataset["identity"]
    ids["labels"] = store.find("captions", reports["classname_draws"].entries["captions"]).manifest["recipe"][
        "prompt"]["labels"]
    recipes, keys = filled(ids)
    made = {}
    for run, rep in reports.items():
        for what, key in rep.entries.items():
            kind, _, t = what.partition(" t=")
            made[f"{kind}:{run}:{t}" if t else (kind if kind == "latents" else f"{kind}:{run}")] = key
    assert made == keys
    for name, key in keys.items():
        assert store.find(name.split(":")[0], key).manifest["recipe"] == recipes[name], name
