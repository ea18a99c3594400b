"""CLIP text features of class prompts: the classifier's weights, computed once per class list.

    T = class_text_features(store, classnames, templates, clip_model, proj=False)   # (C, D)

Each class's prompts (one per template, "a photo of a {}.") go through CLIP's text model; the
features of a class are the mean of its L2-normalised prompt features, normalised again (CLIP's
prompt ensembling). `proj=False` takes the pooled end-of-text token BEFORE the text projection
(`pooler_output`, the paper's "w.o. proj", better for classification and segmentation);
`proj=True` takes `text_embeds` after it ("w. proj", better for SBIR). SD 1.5's own text encoder
has no projection weights, so like the official code this loads a CLIP text model that has them
(openai/clip-vit-large-patch14, the text tower SD 1.5 was trained with).

The result is a store entry of kind `classtext`, keyed by the model's file hashes, the class
names, the templates and the projection switch: a second run, or a second task over the same
class list, reads it back instead of loading CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vermouth_cache import SCHEMA_VERSION
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.models.loading import (Placement, config_model_type, directory_identity, load_pretrained,
                                           resolve_model_dir)
from vermouth_cache.store.entries import Store
from vermouth_cache.store.records import OK
from vermouth_cache.data.vocab import prompt_text


ARRAY = "text"


def classtext_recipe(clip_identity: str, classnames: Sequence[str], templates: Sequence[str], proj: bool) -> dict:
    return {
        "kind": "classtext",
        "schema": SCHEMA_VERSION,
        "clip": clip_identity,
        "classnames": list(classnames),
        "templates": list(templates),
        "features": "text_embeds" if proj else "pooler_output",
        "ensemble": "mean of normalised prompt features, normalised",
        "dtype": "float32",
    }


def class_text_features(store: Store, classnames: Sequence[str], templates: Sequence[str], clip_model: str, *,
                        proj: bool, placement: Placement | None = None) -> np.ndarray:
    """(C, D) float32, unit norm per class; read from the store when already computed."""
    model_dir = resolve_model_dir(clip_model, role="CLIP text model", hub_patterns=["*.json", "*.txt", "*.safetensors"])
    check_clip(model_dir)
    recipe = classtext_recipe(directory_identity(model_dir), classnames, templates, proj)
    n = len(classnames)
    entry = store.entry("classtext", recipe, n_samples=n, shard_size=n,
                        about={"clip_model": clip_model, "n_classes": n, "proj": proj, "templates": list(templates)})
    if 0 not in entry.done_shards(ARRAY):
        feats = encode_prompts(model_dir, classnames, templates, proj=proj, placement=placement)
        entry.ensure_array(ARRAY, (feats.shape[1],), "float32")
        entry.write_shard(ARRAY, 0, [OK] * n, data=feats, run={"clip_model": clip_model})
    entry.touch()  # a training run used it (gc)
    return entry.read(ARRAY)


def refill_classtext(store: Store, entry) -> None:
    """Recompute a classtext entry with the CLIP model it names (`repair`), if that model is unchanged."""
    about, recipe = entry.manifest["about"], entry.manifest["recipe"]
    model_dir = resolve_model_dir(about["clip_model"], role="CLIP text model",
                                  hub_patterns=["*.json", "*.txt", "*.safetensors"])
    if classtext_recipe(directory_identity(model_dir), recipe["classnames"], recipe["templates"],
                        about["proj"]) != recipe:
        raise VermouthError(f"the CLIP model {about['clip_model']} changed since it was made")
    entry.invalidate(ARRAY, 0)
    class_text_features(store, recipe["classnames"], recipe["templates"], about["clip_model"], proj=about["proj"])


def check_clip(model_dir) -> None:
    """Refuse, before any entry is made, a directory that holds another kind of model."""
    model_type = config_model_type(model_dir)
    if model_type not in ("clip", "clip_text_model"):
        raise VermouthError(f"CLIP model {model_dir}: its config.json says model_type {model_type!r}, not a CLIP model")


def encode_prompts(model_dir, classnames: Sequence[str], templates: Sequence[str], *, proj: bool,
                   placement: Placement | None = None) -> np.ndarray:
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    placement = placement or Placement(torch.device("cpu"), torch.float32)
    check_clip(model_dir)
    tokenizer = load_pretrained(CLIPTokenizer, model_dir)
    model = load_pretrained(CLIPTextModelWithProjection, model_dir, placement)
    out = []
    for name in classnames:
        prompts = [prompt_text(t, name) for t in templates]
        tok = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        with torch.inference_mode():
            o = model(input_ids=tok.input_ids.to(placement.device))
            # pooler_output is not a field of the projection model's output: recompute it the way
            # CLIPTextTransformer does (final-LN hidden state at the end-of-text token)
            f = o.text_embeds if proj else _pooled(model, tok.input_ids, o.last_hidden_state)
        f = torch.nn.functional.normalize(f.float(), dim=-1).mean(0)
        out.append(torch.nn.functional.normalize(f, dim=0).cpu().numpy())
    return np.stack(out).astype(np.float32)


def _pooled(model, input_ids: torch.Tensor, last_hidden: torch.Tensor) -> torch.Tensor:
    eos = model.config.eos_token_id
    if eos == 2:  # legacy CLIP configs: the end-of-text token is the highest id
        idx = input_ids.argmax(-1)
    else:
        idx = (input_ids == eos).int().argmax(-1)
    return last_hidden[torch.arange(last_hidden.shape[0]), idx.to(last_hidden.device)]
