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

Tokenizer and processor files are written by hand in the layout the real hub repos use
(vocab.json + merges.txt, vocab.txt, preprocessor_config.json) rather than by `save_pretrained`:
transformers 5 would otherwise write only its own tokenizer.json / processor_config.json, and a
hub-style directory exercises the conversion path real users hit. The tokenizers' vocabularies are
built from data/words.txt so that common caption words are single tokens and texts round-trip.

Determinism: each model is built right after `torch.manual_seed(seed + k)` and every file written
is a function of (seed, words list, library versions) only, so the same seed gives byte-identical
files and their content hashes can key caches.
"""

from __future__ import annotations

import heapq
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import torch

from vermouth_cache.data.bundled import bundled_file
from vermouth_cache.core.atomic import honour_umask


# OpenAI CLIP normalisation (BLIP reuses it) and ImageNet normalisation (ResNet, DINO, DINOv2),
# copied from the real repos' preprocessor configs so features see the same input statistics.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77
CLIP_HIDDEN = 32  # also the UNet's cross_attention_dim: the text states are the UNet's context

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BLIP_DEC = "[DEC]"

# Seed offsets k in torch.manual_seed(seed + k); fixed so adding a model never reseeds the others.
_SEED_OFFSETS = {
    "unet": 0,
    "vae": 1,
    "text_encoder": 2,
    "blip": 3,
    "resnet18": 4,
    "dino": 5,
    "dinov2": 6,
    "clip": 7,
    "sd2_unet": 8,
    "sd2_vae": 9,
    "sd2_text_encoder": 10,
}


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
        "sd": lambda d: _write_sd(d, seed, clip_vocab, clip_merges),
        "blip": lambda d: _write_blip(d, seed, words),
        "resnet18": lambda d: _write_resnet(d, seed),
        "dino": lambda d: _write_dino(d, seed),
        "dinov2": lambda d: _write_dinov2(d, seed),
        "clip": lambda d: _write_clip(d, seed, clip_vocab, clip_merges),
    }
    paths: dict[str, Path] = {}
    # fork_rng: the per-model manual_seed calls must not leak into the caller's global RNG.
    with torch.random.fork_rng(devices=[]), _quiet_libraries():
        for name, write in writers.items():
            d = out / name
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
            write(d)
            honour_umask(d)  # save_pretrained's safetensors files come out 0600
            paths[name] = d
    return paths


# ----------------------------------------------------------------------------- vocabularies


def load_words(words_file: str | Path | None = None) -> list[str]:
    """The caption word list, de-duplicated in file order (order fixes token ids)."""
    path = Path(words_file) if words_file is not None else bundled_file("words.txt")
    seen: dict[str, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        w = line.strip().lower()
        if w and w.isalpha() and w.isascii():
            seen.setdefault(w, None)
    if not seen:
        raise ValueError(f"no words in {path}")
    return list(seen)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (same as transformers' CLIP tokenization)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_clip_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train CLIP-style BPE merges on `words` until each word is one token; return (vocab, merges).

    Real BPE training (most frequent pair first) rather than one merge chain per word: encoding
    applies merges by rank, and only merges learnt this way are guaranteed to re-assemble every
    training word. Ties break on the pair itself, so the result is deterministic.
    """
    segs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    counts: Counter[tuple[str, str]] = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, s in enumerate(segs):
        for pair in zip(s, s[1:]):
            counts[pair] += 1
            where[pair].add(i)
    # Lazy-deletion heap: stale entries are skipped when their count no longer matches.
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap:
        negc, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -negc or negc == 0:
            continue
        merges.append(pair)
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair)):
            s = segs[i]
            for p in zip(s, s[1:]):
                counts[p] -= 1
                touched.add(p)
            merged, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == pair:
                    merged.append(s[j] + s[j + 1])
                    j += 2
                else:
                    merged.append(s[j])
                    j += 1
            segs[i] = merged
            for p in zip(merged, merged[1:]):
                counts[p] += 1
                where[p].add(i)
                touched.add(p)
        for p in sorted(touched):
            if counts[p] <= 0:
                counts.pop(p, None)
                where.pop(p, None)
            else:
                heapq.heappush(heap, (-counts[p], p))

    # Same id layout as OpenAI's CLIP vocab: bytes, bytes + "</w>", merges in rank order, specials.
    b2u = list(bytes_to_unicode().values())
    tokens = b2u + [t + "</w>" for t in b2u] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def _dump_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_clip_tokenizer(d: Path, vocab: dict[str, int], merges: list[tuple[str, str]], *,
                          pad_token: str = CLIP_EOS) -> None:
    # The four files the SD 1.5 / OpenAI CLIP repos ship; "#version" header as OpenAI's merges.txt.
    # SD 2.x's OpenCLIP tokenizer pads with "!" instead of <|endoftext|>.
    _dump_json(d / "vocab.json", vocab)
    (d / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    _dump_json(
        d / "special_tokens_map.json",
        {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": pad_token, "unk_token": CLIP_EOS},
    )
    _dump_json(
        d / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "bos_token": CLIP_BOS,
            "do_lower_case": True,
            "eos_token": CLIP_EOS,
            "errors": "replace",
            "model_max_length": CLIP_MAX_LENGTH,
            "pad_token": pad_token,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": CLIP_EOS,
        },
    )


def _clip_text_config(vocab: dict[str, int], projection_dim: int):
    from transformers import CLIPTextConfig

    # Three layers so "penultimate hidden state" (clip skip) differs from the last one.
    # Token ids follow the tokenizer (the real SD config's 0/1/2 would select the legacy
    # argmax pooling; matching ids keep pooling on the true first <|endoftext|>).
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=projection_dim,
        bos_token_id=vocab[CLIP_BOS],
        eos_token_id=vocab[CLIP_EOS],
        pad_token_id=vocab[CLIP_EOS],
    )


# ----------------------------------------------------------------------------- Stable Diffusion


def _tiny_unet(**width):
    """SD's exact block layout (so block names and feature taps match the real U-net), with the
    widths cut: 32/64/64/64 channels, 8 norm groups; `width` sets the text width and heads."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        norm_num_groups=8,
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        act_fn="silu",
        **width,
    )


def _save_pipeline(d: Path, **parts) -> None:
    """An SD pipeline directory in diffusers' on-disk format (safetensors), no safety checker."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(d, safe_serialization=True)


def _tiny_vae():
    """Four encoder blocks = three downsamplings = factor 8, so 128 px images give 16x16 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.18215,
    )


def _write_sd(d: Path, seed: int, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    from diffusers import PNDMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed + _SEED_OFFSETS["unet"])
    unet = _tiny_unet(cross_attention_dim=CLIP_HIDDEN,
                      attention_head_dim=4)  # diffusers reads this as the number of heads, as SD 1.5's "8" is
    torch.manual_seed(seed + _SEED_OFFSETS["vae"])
    vae = _tiny_vae()

    torch.manual_seed(seed + _SEED_OFFSETS["text_encoder"])
    text_encoder = CLIPTextModel(_clip_text_config(vocab, projection_dim=CLIP_HIDDEN))

    tok_dir = d / "tokenizer"
    tok_dir.mkdir()
    _write_clip_tokenizer(tok_dir, vocab, merges)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        set_alpha_to_one=False,
        skip_prk_steps=True,
    )
    _save_pipeline(d, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)

    # save_pretrained rewrote the tokenizer in transformers 5's own layout; put back the
    # hub layout so loading goes through vocab.json + merges.txt like runwayml's repo.
    shutil.rmtree(tok_dir)
    tok_dir.mkdir()
    _write_clip_tokenizer(tok_dir, vocab, merges)

    # SD 1.5's scheduler_config.json carries "clip_sample": false although PNDM has no such
    # argument: it matters when another scheduler (DDPM/DDIM default to clipping) is loaded
    # from this config, so keep it like the real file does.
    sched_cfg = d / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched_cfg.read_text())
    cfg["clip_sample"] = False
    _dump_json(sched_cfg, cfg)


# ----------------------------------------------------------------------------- Stable Diffusion 2.x

SD2_TEXT_HIDDEN = 48  # SD 2.x's 1024 scaled down; differs from the SD 1.5 tiny model's 32 on purpose


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
    with torch.random.fork_rng(devices=[]), _quiet_libraries():
        _write_sd2(out, seed, vocab, merges)
    return out


def _write_sd2(d: Path, seed: int, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    from diffusers import DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed + _SEED_OFFSETS["sd2_unet"])
    unet = _tiny_unet(cross_attention_dim=SD2_TEXT_HIDDEN,
                      attention_head_dim=(2, 4, 8, 8),  # heads per block, as SD 2's [5, 10, 20, 20]
                      use_linear_projection=True, upcast_attention=True)
    torch.manual_seed(seed + _SEED_OFFSETS["sd2_vae"])
    vae = _tiny_vae()

    torch.manual_seed(seed + _SEED_OFFSETS["sd2_text_encoder"])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=SD2_TEXT_HIDDEN,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu",  # OpenCLIP ViT-H; OpenAI CLIP (SD 1.5) uses quick_gelu
        projection_dim=SD2_TEXT_HIDDEN,
        bos_token_id=vocab[CLIP_BOS],
        eos_token_id=vocab[CLIP_EOS],
        pad_token_id=vocab["!"],
    ))

    tok_dir = d / "tokenizer"
    tok_dir.mkdir()
    _write_clip_tokenizer(tok_dir, vocab, merges, pad_token="!")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    # stabilityai/stable-diffusion-2-1's scheduler_config.json
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    _save_pipeline(d, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    shutil.rmtree(tok_dir)  # back to the hub layout, as for SD 1.5
    tok_dir.mkdir()
    _write_clip_tokenizer(tok_dir, vocab, merges, pad_token="!")


# ----------------------------------------------------------------------------- BLIP


def _write_blip(d: Path, seed: int, words: list[str]) -> None:
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipTextConfig, BlipVisionConfig

    # BERT-style vocab: specials at 0..4 like bert-base-uncased ([PAD]=0), then caption words,
    # then [DEC], the decoder's start token (real BLIP appends it after the BERT vocab too).
    vocab = BERT_SPECIALS + [w for w in words if w not in BERT_SPECIALS] + [BLIP_DEC]
    ids = {t: i for i, t in enumerate(vocab)}
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")

    text_config = BlipTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        encoder_hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        # At BERT's 0.02 the tiny decoder's cross-attention barely moves its residual stream and
        # every image gets the same caption; 0.1 makes captions depend on the image, as a
        # captioner's should, so per-image prompt paths are exercised with distinct texts.
        initializer_range=0.1,
        bos_token_id=ids[BLIP_DEC],
        eos_token_id=ids["[SEP]"],
        sep_token_id=ids["[SEP]"],
        pad_token_id=ids["[PAD]"],
    )
    vision_config = BlipVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        # BLIP's default 1e-10 leaves the random vision tower ~zero, so captions would ignore
        # the image; a normal init keeps them image-dependent like a real captioner's.
        initializer_range=0.02,
    )
    config = BlipConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        projection_dim=16,
        image_text_hidden_size=16,
    )
    torch.manual_seed(seed + _SEED_OFFSETS["blip"])
    model = BlipForConditionalGeneration(config)
    # A random decoder may well argmax onto [PAD]/[UNK]/[CLS]/[MASK]/[DEC], which
    # skip_special_tokens then strips, leaving an empty caption for some seeds. Banning them
    # via the (saved, tied) output bias makes every caption a string of vocabulary words.
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.bias
        for t in ("[PAD]", "[UNK]", "[CLS]", "[MASK]", BLIP_DEC):
            bias[ids[t]] = -1e4
    model.save_pretrained(d, safe_serialization=True)

    _dump_json(
        d / "preprocessor_config.json",
        {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": CLIP_MEAN,
            "image_processor_type": "BlipImageProcessor",
            "image_std": CLIP_STD,
            "processor_class": "BlipProcessor",
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"height": 32, "width": 32},
        },
    )
    _dump_json(
        d / "special_tokens_map.json",
        {
            "bos_token": BLIP_DEC,
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
            "pad_token": "[PAD]",
            "sep_token": "[SEP]",
            "unk_token": "[UNK]",
        },
    )
    _dump_json(
        d / "tokenizer_config.json",
        {
            "bos_token": BLIP_DEC,
            "cls_token": "[CLS]",
            "do_basic_tokenize": True,
            "do_lower_case": True,
            "mask_token": "[MASK]",
            "model_max_length": 512,
            "pad_token": "[PAD]",
            "processor_class": "BlipProcessor",
            "sep_token": "[SEP]",
            "strip_accents": None,
            "tokenize_chinese_chars": True,
            "tokenizer_class": "BertTokenizer",
            "unk_token": "[UNK]",
        },
    )


# ----------------------------------------------------------------------------- vision backbones


def _write_resnet(d: Path, seed: int) -> None:
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        hidden_act="relu",
        downsample_in_first_stage=False,
    )
    torch.manual_seed(seed + _SEED_OFFSETS["resnet18"])
    ResNetModel(config).save_pretrained(d, safe_serialization=True)
    # microsoft/resnet-18's processor (resize to size/crop_pct, centre crop), at 64 px not 224.
    _dump_json(
        d / "preprocessor_config.json",
        {
            "crop_pct": 0.875,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": IMAGENET_MEAN,
            "image_processor_type": "ConvNextImageProcessor",
            "image_std": IMAGENET_STD,
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": 64},
        },
    )


def _write_dino(d: Path, seed: int) -> None:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=128,
        patch_size=16,
        qkv_bias=True,
    )
    torch.manual_seed(seed + _SEED_OFFSETS["dino"])
    # No pooler, as in facebook/dino-vitb16: load with ViTModel.from_pretrained(d,
    # add_pooling_layer=False), exactly as for the real checkpoint.
    ViTModel(config, add_pooling_layer=False).save_pretrained(d, safe_serialization=True)
    _dump_json(
        d / "preprocessor_config.json",
        {
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": IMAGENET_MEAN,
            "image_processor_type": "ViTImageProcessor",
            "image_std": IMAGENET_STD,
            "resample": 2,
            "rescale_factor": 1 / 255,
            "size": {"height": 128, "width": 128},
        },
    )


def _write_dinov2(d: Path, seed: int) -> None:
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        mlp_ratio=4,
        image_size=126,  # 9 x 9 patches of 14 px
        patch_size=14,
    )
    torch.manual_seed(seed + _SEED_OFFSETS["dinov2"])
    Dinov2Model(config).save_pretrained(d, safe_serialization=True)
    # facebook/dinov2-base resizes to 256 and crops 224; same 8/7 ratio around a 126 px crop.
    _dump_json(
        d / "preprocessor_config.json",
        {
            "crop_size": {"height": 126, "width": 126},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": IMAGENET_MEAN,
            "image_processor_type": "BitImageProcessor",
            "image_std": IMAGENET_STD,
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": 144},
        },
    )


def _write_clip(d: Path, seed: int, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed + _SEED_OFFSETS["clip"])
    CLIPTextModelWithProjection(_clip_text_config(vocab, projection_dim=16)).save_pretrained(
        d, safe_serialization=True
    )
    _write_clip_tokenizer(d, vocab, merges)


# ----------------------------------------------------------------------------- helpers


class _quiet_libraries:
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
