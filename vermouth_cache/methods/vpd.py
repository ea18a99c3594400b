"""VPD (Zhao et al., ICCV 2023), frozen: the clean, unscaled latent at t=1, conditioned on a context table.

    latent       E(x).latent_dist.mean, NO scaling factor (VPD's encode().mode())
    noise / t    none, t=1 (fixed: VPD's code, not its paper's t=0)
    conditioning a context table (`vermouth-cache tables`): every row for every image (seg: 150
                 ADE20K classes), the row of the image's class (depth: its scene, which uses the
                 label, also at test time), or the sample's own sentence as CLIP token states,
                 padded to --text-tokens, no mask (refer)
    taps         up_blocks.0.resnets.1, up_blocks.1.attentions.1, up_blocks.2.attentions.1,
                 up_blocks.3: ldm output_blocks 1, 4, 7 and 11 (VPD.md section 1)
    attention    cross-attention probabilities averaged over heads, then over EVERY down and up
                 layer of one size (layer-weighted: attn at 1/4 of the latent = 2 down + 3 up
                 layers), mid excluded; maps up to half the latent's side by default (A32 at 512),
                 the latent's own size too with --attn-maps a64. Channels = context tokens.
    merge        "vpd": features then maps per level, high resolution first (train/pyramid.py)

The U-net and the text adapter stay frozen (the adapter at gamma = 0): this is "VPD-frozen", not
the paper's fine-tuned model; train's online mode trains the adapter from cached latents.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.tables import read_table
from vermouth_cache.methods.base import LAYER_OUTPUTS, UNSCALED, Method
from vermouth_cache.methods.conditioning import Conditioning, register_conditioning
from vermouth_cache.models.taps import ATTN_PREFIX, STAGES, AttentionMaps

VPD_TAPS = ("up_blocks.0.resnets.1", "up_blocks.1.attentions.1", "up_blocks.2.attentions.1", "up_blocks.3")
ATTN_SELECTORS = {"a32": 1, "a64": 0, "none": None}  # the finest level kept (level k = latent side / 2**k)


def attn_level_tap(level: int) -> str:
    """The stored name of the maps at latent side / 2**level: attn.level1 is VPD's attn32 at 512."""
    return f"{ATTN_PREFIX}level{level}"


class LayerWeightedBySize(AttentionMaps):
    """VPD's `process_attn`: one plain mean over every down and up cross-attention layer of a size."""

    name = "layer-weighted by size (down+up)"

    def check(self, selector: str) -> None:
        if selector not in ATTN_SELECTORS:
            raise VermouthError(f"unknown attention selector {selector!r} for vpd (choose from "
                                f"{', '.join(ATTN_SELECTORS)})")

    def taps(self, selector, with_cross_attention) -> tuple[str, ...]:
        finest = ATTN_SELECTORS.get(selector or "none")
        if finest is None:
            return ()
        # SD's cross-attention sits at levels 0-2 (64, 32, 16 at 512); level 3 (8) is the mid block's, excluded
        return tuple(attn_level_tap(k) for k in range(finest, 3))

    def blocks(self, taps, with_cross_attention) -> tuple[str, ...]:
        have = set(with_cross_attention)
        return tuple(b for b in STAGES["down"] + STAGES["up"] if b in have)

    def aggregate(self, records, latent_hw) -> dict[str, torch.Tensor]:
        h, w = latent_hw
        by_size: dict[int, list[torch.Tensor]] = defaultdict(list)
        for maps in records.values():
            for m in maps:
                by_size[m.shape[1]].append(m)
        out = {}
        for level in range(3):
            side_h, side_w = h >> level, w >> level
            layers = by_size.get(side_h * side_w)
            if layers:
                avg = torch.stack(layers).mean(0).detach()  # (B, HW, T): mean over all layers of this size
                out[attn_level_tap(level)] = avg.transpose(1, 2).reshape(avg.shape[0], avg.shape[2], side_h, side_w)
        return out


class TableRows(Conditioning):
    """Every row of the context table, for every image (VPD seg: the 150 ADE20K class rows)."""
    name = "table"
    help = "table (every row of --context-table: vpd seg)"
    needs_table = True
    ALL = "<all rows>"

    def prompt_recipe(self, req, *, captioner_id, labels_key) -> dict:
        return {"mode": "table", "table": read_table(req.context_table).sha256, "rows": "all"}

    def texts(self, req, samples) -> list[str]:
        return [self.ALL for _ in samples]

    def encode(self, sd, texts, req, *, batch) -> np.ndarray:
        return np.repeat(read_table(req.context_table).values[None], len(texts), axis=0)

    def check(self, req, sd, samples) -> None:
        read_table(req.context_table).check_width(sd.condition_width)

    def tokens(self, req, sd) -> int:
        return len(read_table(req.context_table).rows)


class ClassRow(Conditioning):
    """The one row named by the sample's class (VPD depth: its scene class, also at test time)."""
    name = "table-class"
    help = "table-class (the row of the sample's class in --context-table: vpd depth; uses the label!)"
    needs_table = True
    uses_label = True

    def prompt_recipe(self, req, *, captioner_id, labels_key) -> dict:
        return {"mode": "table-class", "table": read_table(req.context_table).sha256, "labels": labels_key}

    def texts(self, req, samples) -> list[str]:
        table = read_table(req.context_table)
        for s in samples:
            if s.classname is None:
                raise VermouthError(f"--prompt table-class needs a class per sample; {s.id} has none")
            table.row(s.classname, sample=s.id)
        return [s.classname for s in samples]

    def encode(self, sd, texts, req, *, batch) -> np.ndarray:
        table = read_table(req.context_table)
        return np.stack([table.row(name) for name in texts])

    def check(self, req, sd, samples) -> None:
        read_table(req.context_table).check_width(sd.condition_width)
        self.texts(req, samples)  # every sample has a class with a row

    def tokens(self, req, sd) -> int:
        return 1


class Sentence(Conditioning):
    """Each sample's own sentence: CLIP last_hidden_state of all --text-tokens tokens (VPD refer)."""
    name = "sentence"
    help = "sentence (each sample's own text, e.g. a referring expression: vpd refer)"

    def prompt_recipe(self, req, *, captioner_id, labels_key) -> dict:
        return {"mode": "sentence", "sentences": labels_key}

    def texts(self, req, samples) -> list[str]:
        missing = [s.id for s in samples if s.text is None]
        if missing:
            raise VermouthError(f"--prompt sentence needs a sentence per sample; {missing[0]} has none")
        return [s.text for s in samples]


for _cond in (TableRows(), ClassRow(), Sentence()):
    register_conditioning(_cond)

LAYER_WEIGHTED = LayerWeightedBySize()

METHOD = Method(
    name="vpd",
    summary="vpd (frozen VPD: unscaled latent at t=1, context-table text, 4 hierarchical taps + A32 maps)",
    conditionings=("table", "table-class", "sentence"),
    latent=UNSCALED,
    taps=LAYER_OUTPUTS,
    attention=LAYER_WEIGHTED,
    merge="vpd",
    fixed={"t": (1,), "noise": "none"},
    default_taps=",".join(VPD_TAPS),
    defaults={"attn_maps": "a32", "prompt": "table", "resolution": 512},
)
