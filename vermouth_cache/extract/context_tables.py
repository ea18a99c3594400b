"""Making context tables from a CLIP text model: VPD's class embeddings, reproducibly.

    values = class_embeddings("openai/clip-vit-large-patch14", classnames, templates)   # (C, 768)

Each class's prompts (one per template) go through the CLIP text transformer; a class's row is
the PLAIN mean of its prompts' `pooler_output` (the final-LN state at the end-of-text token,
before any projection), with no normalisation: what VPD's `dump_nyu_text_embeddings.py` does
(VPD.md section 1), unlike the unit-norm ensemble of `classtext` that Vermouth's classifiers use.
The model may be a CLIP text model or an SD pipeline directory, whose own text encoder is the
one whose width its U-net attends to.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vermouth_cache.data.tables import write_table
from vermouth_cache.data.vocab import prompt_text
from vermouth_cache.models.loading import Placement, directory_identity, load_pretrained, resolve_model_dir

AVERAGING = "plain mean of pooler_output over templates, no normalisation"


def _text_model(model_dir: Path, placement: Placement):
    from transformers import CLIPTextModel, CLIPTokenizer

    sub = {"subfolder": "text_encoder"} if (model_dir / "text_encoder").is_dir() else {}
    tok_sub = {"subfolder": "tokenizer"} if (model_dir / "tokenizer").is_dir() else {}
    return load_pretrained(CLIPTokenizer, model_dir, **tok_sub), load_pretrained(CLIPTextModel, model_dir, placement,
                                                                                  **sub)


def class_embeddings(clip_model: str, classnames: Sequence[str], templates: Sequence[str], *,
                     placement: Placement | None = None) -> tuple[np.ndarray, dict]:
    """((C, D) float32 rows, the facts they depend on) for `classnames` under `templates`."""
    placement = placement or Placement(torch.device("cpu"), torch.float32)
    model_dir = resolve_model_dir(clip_model, role="CLIP text model", hub_patterns=["*.json", "*.txt", "*.safetensors"])
    tokenizer, model = _text_model(model_dir, placement)
    rows = []
    for name in classnames:
        prompts = [prompt_text(t, name) for t in templates]
        tok = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        with torch.inference_mode():
            out = model(input_ids=tok.input_ids.to(placement.device))
        rows.append(out.pooler_output.float().mean(0).cpu().numpy())
    about = {"source": "vermouth-cache tables make", "clip_model": clip_model, "clip": directory_identity(model_dir),
             "templates": list(templates), "averaging": AVERAGING}
    return np.stack(rows).astype(np.float32), about


def make_table(out: str | Path, clip_model: str, classnames: Sequence[str], templates: Sequence[str]) -> Path:
    values, about = class_embeddings(clip_model, classnames, templates)
    return write_table(out, values, classnames, about)
