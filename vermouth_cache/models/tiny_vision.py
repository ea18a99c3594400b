"""The tiny BLIP captioner and image experts (ResNet-18, DINO ViT, DINOv2), in their real formats.

Processor configs are written by hand in the layout the real hub repos ship (vocab.txt,
preprocessor_config.json), with the real normalisation constants so features see the same input
statistics.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vermouth_cache.models.tiny_vocab import SEED_OFFSETS, dump_json

# OpenAI CLIP normalisation (BLIP reuses it) and ImageNet normalisation (ResNet, DINO, DINOv2),
# copied from the real repos' preprocessor configs.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BLIP_DEC = "[DEC]"


# ----------------------------------------------------------------------------- BLIP


def write_blip(d: Path, seed: int, words: list[str]) -> None:
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
    torch.manual_seed(seed + SEED_OFFSETS["blip"])
    model = BlipForConditionalGeneration(config)
    # A random decoder may well argmax onto [PAD]/[UNK]/[CLS]/[MASK]/[DEC], which
    # skip_special_tokens then strips, leaving an empty caption for some seeds. Banning them
    # via the (saved, tied) output bias makes every caption a string of vocabulary words.
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.bias
        for t in ("[PAD]", "[UNK]", "[CLS]", "[MASK]", BLIP_DEC):
            bias[ids[t]] = -1e4
    model.save_pretrained(d, safe_serialization=True)

    dump_json(
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
    dump_json(
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
    dump_json(
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


def write_resnet(d: Path, seed: int) -> None:
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
    torch.manual_seed(seed + SEED_OFFSETS["resnet18"])
    ResNetModel(config).save_pretrained(d, safe_serialization=True)
    # microsoft/resnet-18's processor (resize to size/crop_pct, centre crop), at 64 px not 224.
    dump_json(
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


def write_dino(d: Path, seed: int) -> None:
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
    torch.manual_seed(seed + SEED_OFFSETS["dino"])
    # No pooler, as in facebook/dino-vitb16: load with ViTModel.from_pretrained(d,
    # add_pooling_layer=False), exactly as for the real checkpoint.
    ViTModel(config, add_pooling_layer=False).save_pretrained(d, safe_serialization=True)
    dump_json(
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


def write_dinov2(d: Path, seed: int) -> None:
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        mlp_ratio=4,
        image_size=126,  # 9 x 9 patches of 14 px
        patch_size=14,
    )
    torch.manual_seed(seed + SEED_OFFSETS["dinov2"])
    Dinov2Model(config).save_pretrained(d, safe_serialization=True)
    # facebook/dinov2-base resizes to 256 and crops 224; same 8/7 ratio around a 126 px crop.
    dump_json(
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

