"""Tiny, randomly initialised but complete models in their real on-disk formats.

`write_tiny_models(out_dir, seed)` writes one directory per model the project loads from the hub:

    sd/        Stable Diffusion 1.5-shaped diffusers pipeline (unet, vae, text_encoder, tokenizer,
               scheduler; no safety checker), same block structure as SD 1.5, tiny widths
    blip/      BlipForConditionalGeneration + BlipProcessor (BERT word-piece tokenizer with [DEC])
    resnet18/  transformers ResNetModel + ConvNext-style image processor (as microsoft/resnet-18)
    dino/      ViTModel without pooler + ViTImageProcessor (as facebook/dino-vitb16)
    dinov2/    Dinov2Model + BitImageProcessor (as facebook/dinov2-base)
    clip/      CLIPTextModelWithProjection + CLIPTokenizer (text side of openai/clip-vit-large-patch14)

Why: there is no model hub in tests, CI or the offline demo, yet the code under test must go through
the same `from_pretrained` path a user's hub id does (config parsing, safetensors loading, tokenizer
files, processor configs). So these are not mocks: every file is in the format the real repos ship,
only the widths are tiny: ~17 MB in all (13 MB of it the UNet, which keeps SD 1.5's full block
layout), written in well under a second once torch/transformers/diffusers are imported.

The writers: `tiny_sd` (the SD pipelines, SD 2.1-shaped too: `write_tiny_sd2`, and the class-prompt
CLIP), `tiny_vision` (BLIP and the image experts), `tiny_vocab` (word list, vocabularies, seeds).

Determinism: each model is built right after `torch.manual_seed(seed + k)` and every file written
is a function of (seed, words list, library versions) only, so the same seed gives byte-identical
files and their content hashes can key caches.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from vermouth_cache.core.atomic import honour_umask
from vermouth_cache.models.tiny_sd import write_clip, write_sd, write_sd2
from vermouth_cache.models.tiny_vision import write_blip, write_dino, write_dinov2, write_resnet
from vermouth_cache.models.tiny_vocab import build_clip_bpe, load_words


def write_tiny_models(
    out_dir: str | Path, seed: int = 0, *, words_file: str | Path | None = None
) -> dict[str, Path]:
    """Write all tiny models under `out_dir`; return {"sd", "blip", "resnet18", "dino", "dinov2", "clip"} -> dir.

    Existing model directories are replaced, so a rewrite never leaves stale files behind that
    would change the directory's content hash.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    words = load_words(words_file)
    clip_vocab, clip_merges = build_clip_bpe(words)

    writers = {
        "sd": lambda d: write_sd(d, seed, clip_vocab, clip_merges),
        "blip": lambda d: write_blip(d, seed, words),
        "resnet18": lambda d: write_resnet(d, seed),
        "dino": lambda d: write_dino(d, seed),
        "dinov2": lambda d: write_dinov2(d, seed),
        "clip": lambda d: write_clip(d, seed, clip_vocab, clip_merges),
    }
    paths: dict[str, Path] = {}
    # fork_rng: the per-model manual_seed calls must not leak into the caller's global RNG.
    with torch.random.fork_rng(devices=[]), quiet_libraries():
        for name, write in writers.items():
            d = out / name
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
            write(d)
            honour_umask(d)  # save_pretrained's safetensors files come out 0600
            paths[name] = d
    return paths


def write_tiny_sd2(out_dir: str | Path, seed: int = 0, *, words_file: str | Path | None = None) -> Path:
    """Write a tiny SD 2.1-shaped diffusers pipeline to `out_dir` (replaced if it exists); return it.

    What differs from the SD 1.5 one, as in stabilityai/stable-diffusion-2-1: the U-net's
    attention_head_dim is a per-block list, its transformers use linear projections
    (`use_linear_projection`) and upcast attention, its cross_attention_dim is the OpenCLIP text
    width (1024 there, 48 here); the text encoder is OpenCLIP's converted to CLIPTextModel (gelu,
    already cut before its last layer, so last_hidden_state is the penultimate layer SD 2 uses),
    its tokenizer pads with "!"; the scheduler is a DDIM config with prediction_type v_prediction.
    Same seed, same bytes.
    """
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    vocab, merges = build_clip_bpe(load_words(words_file))
    with torch.random.fork_rng(devices=[]), quiet_libraries():
        write_sd2(out, seed, vocab, merges)
    return out


class quiet_libraries:
    """Silence transformers/diffusers chatter (backend fallbacks, shard progress bars) while writing.

    Uses the libraries' own verbosity switches: both reset their root logger's level when first
    configured, so setting it through `logging` before their import would not stick.
    """

    def __enter__(self):
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        self._saved = []
        for lib in (tlog, dlog):
            self._saved.append((lib, lib.get_verbosity(), lib.is_progress_bar_enabled()))
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        for lib, verbosity, bars in self._saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()
        return False
