"""Conditionings: where the text a U-net is conditioned on comes from, one class per source.

    blip        captions of each image by a BLIP captioner (the paper's default)
    null        the empty prompt
    random      8 seeded random words per sample (an ablation)
    classname   "a photo of a {class}." (uses the label!)
    text:TEXT   one fixed text for every sample

A conditioning makes one text per sample (`texts`, or the captioner for `needs_captioner`), says
what the captions recipe records about it (`prompt_recipe`), and encodes texts into U-net
conditions (`encode`, by default the backbone's text encoder and layer). A new one is a
`Conditioning` subclass passed to `register_conditioning`, from the method file that uses it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from functools import cache

import numpy as np

from vermouth_cache.data.bundled import bundled_file

CLASSNAME_TEMPLATE = "a photo of a {}."
RANDOM_PROMPT_WORDS = 8


class Conditioning:
    name: str
    syntax: str = ""  # how --prompt names it, when that is not just its name ("text:YOUR TEXT")
    help: str
    needs_captioner = False  # its texts come from the captioner model, which looks at the images
    uses_label = False  # its texts depend on the sample's label (recorded in the captions entry)
    needs_table = False  # reads the request's --context-table

    def accepts(self, prompt: str) -> bool:
        return prompt == self.name

    def prompt_recipe(self, req, *, captioner_id: str | None, labels_key: str) -> dict:
        """The facts its texts depend on, as the captions recipe's "prompt"."""
        raise NotImplementedError

    def texts(self, req, samples: Sequence) -> list[str]:
        """One text per sample (sources that need no model)."""
        raise NotImplementedError

    def encode(self, sd, texts: Sequence[str], req, *, batch: int) -> np.ndarray:
        """(N, L, D) float32 U-net conditions of `texts` (the request's text layer and length)."""
        return sd.text_states(texts, layer=req.text_layer, batch=batch, max_length=req.text_tokens)

    def check(self, req, sd, samples: Sequence) -> None:
        """Refuse, before any entry is made, a request this source cannot serve with this model."""

    def tokens(self, req, sd) -> int:
        """L of its (N, L, D) conditions (what a dry run sizes the text entry by)."""
        return req.text_tokens or sd.config("text_encoder")["max_position_embeddings"]


class Captions(Conditioning):
    name = "blip"
    help = "blip (captions of each image)"
    needs_captioner = True

    def prompt_recipe(self, req, *, captioner_id, labels_key) -> dict:
        return {"mode": "blip", "captioner": captioner_id, "prefix": req.caption_prefix,
                "min_new_tokens": req.caption_min_tokens, "max_new_tokens": req.caption_max_tokens,
                "decoding": "greedy"}


class Null(Conditioning):
    name = "null"
    help = "null (empty)"

    def prompt_recipe(self, req, *, captioner_id, labels_key) -> dict:
        return {"mode": "null"}

    def texts(self, req, samples) -> list[str]:
        return ["" for _ in samples]


@cache
def _words() -> tuple[str, ...]:
    return tuple(w.strip() for w in bundled_file("words.txt").read_text().splitlines() if w.strip())


def random_prompt(seed: int, sample_id: str) -> str:
    """Seeded random words: the `random` prompt ablation, reproducible per sample."""
    s = int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}:prompt".encode()).digest()[:8], "little")
    rng = random.Random(s)
    return " ".join(rng.choice(_words()) for _ in range(RANDOM_PROMPT_WORDS))


class RandomWords(Conditioning):
    name = "random"
    help = "random (seeded random words)"

    def prompt_recipe(self, req, *, captioner_id, labels_key) -> dict:
        return {"mode": "random", "seed": req.seed, "words": "data/words.txt", "n_words": RANDOM_PROMPT_WORDS}

    def texts(self, req, samples) -> list[str]:
        return [random_prompt(req.seed, s.id) for s in samples]


class ClassName(Conditioning):
    name = "classname"
    help = "classname (uses the label!)"
    uses_label = True

    def prompt_recipe(self, req, *, captioner_id, labels_key) -> dict:
        return {"mode": "classname", "labels": labels_key, "template": CLASSNAME_TEMPLATE}

    def texts(self, req, samples) -> list[str]:
        return [CLASSNAME_TEMPLATE.format(s.classname) for s in samples]


class FixedText(Conditioning):
    name = "text"
    syntax = "text:YOUR TEXT"
    help = "text:YOUR TEXT"
    PREFIX = "text:"

    def accepts(self, prompt: str) -> bool:
        return prompt.startswith(self.PREFIX)

    def prompt_recipe(self, req, *, captioner_id, labels_key) -> dict:
        return {"mode": "text", "text": req.prompt[len(self.PREFIX):]}

    def texts(self, req, samples) -> list[str]:
        return [req.prompt[len(self.PREFIX):] for _ in samples]


CONDITIONINGS: dict[str, Conditioning] = {}


def register_conditioning(cond: Conditioning) -> Conditioning:
    CONDITIONINGS[cond.name] = cond
    return cond


for _cond in (Captions(), Null(), RandomWords(), ClassName(), FixedText()):
    register_conditioning(_cond)


def conditioning_of(prompt: str) -> Conditioning | None:
    """The conditioning a --prompt value names, or None."""
    return next((c for c in CONDITIONINGS.values() if c.accepts(prompt)), None)
