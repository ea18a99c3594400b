"""Loading the frozen models the way users load them, and naming them by their bytes.

Every model is a hub id or a local directory, loaded with diffusers/transformers
`from_pretrained`; a hub id is first resolved to a local snapshot so that its files can be
hashed. A component's identity is the sha256 of the files `from_pretrained` reads (configs,
tokenizer files, the non-variant weights), so a renamed copy shares a cache and a fine-tuned one
does not. Components load lazily: a run that only needs the U-net never reads the VAE. The SD
pipeline itself is `pipeline.StableDiffusion`; the captioner and the image experts are here.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.hashing import file_sha256, recipe_key

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"  # CLIP with projection, for class-prompt features
EXPERT_MODELS = {
    "resnet18": "microsoft/resnet-18",
    "dino": "facebook/dino-vitb16",
    "dinov2": "facebook/dinov2-base",
}
EXPERT_MODEL_TYPES = {"resnet18": "resnet", "dino": "vit", "dinov2": "dinov2"}  # config.json model_type

# Files from_pretrained reads; weight variants (fp16, non-EMA) and other frameworks are not.
_READ_PATTERNS = ("*.json", "*.txt", "*.model", "*.safetensors", "*.bin")
_VARIANT_PATTERNS = ("*.fp16.*", "*.non_ema.*", "*.ema.*", "*.bf16.*", "*.msgpack", "*.onnx", "*.h5")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(spec: str, *, role: str, hub_patterns: list[str]) -> Path:
    """A local directory for `spec`: the directory itself, or a hub snapshot of the files needed."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise VermouthError(f"{role} {spec!r} is a file, not a model directory")
    if not HUB_ID.match(spec):
        raise VermouthError(f"{role} {spec!r}: no such model directory (and not a hub id of the form org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=hub_patterns, ignore_patterns=list(_VARIANT_PATTERNS)))
    except Exception as exc:  # hub errors come in many types; the user needs the id and the cause
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VermouthError(f"{role} {spec!r}: no such local directory, and cannot fetch it from the model hub "
                            f"({first_line[:200]})") from None


def _files_read(directory: Path) -> list[Path]:
    files = [
        p
        for p in sorted(directory.iterdir())
        if p.is_file()
        and any(fnmatch.fnmatch(p.name, pat) for pat in _READ_PATTERNS)
        and not any(fnmatch.fnmatch(p.name, pat) for pat in _VARIANT_PATTERNS)
    ]
    if any(p.suffix == ".safetensors" for p in files):  # safetensors wins over .bin in from_pretrained
        files = [p for p in files if p.suffix != ".bin"]
    return files


def directory_identity(directory: Path) -> str:
    """Hash of (file name, sha256) for every file from_pretrained reads in `directory`."""
    files = _files_read(directory)
    if not files:
        raise VermouthError(f"model directory {str(directory)!r} holds no config or weight files")
    return recipe_key({p.name: file_sha256(p) for p in files}, length=32)


@contextlib.contextmanager
def _quiet():
    """Library warnings and per-file progress bars off while loading: users see ours only."""
    import transformers

    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers")]
    levels = [lg.level for lg in loggers]
    bars = transformers.utils.logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
        if bars:
            transformers.utils.logging.enable_progress_bar()


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")


def refuse_pickled_weights(directory: Path) -> None:
    """Weights load from safetensors only: a pickle can run code when it is loaded."""
    names = [p.name for p in directory.iterdir() if p.is_file()] if directory.is_dir() else []
    if any(n.endswith(".safetensors") for n in names):
        return
    pickled = [n for n in names if any(fnmatch.fnmatch(n, pat) for pat in PICKLED_WEIGHTS)]
    if pickled:
        raise VermouthError(f"{directory} holds only pickled weights ({', '.join(sorted(pickled))}); vermouth-cache "
                            "loads safetensors only. Convert them once where you trust the file, e.g. "
                            "`Model.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)`")


def load_pretrained(cls, path: Path, placement: "Placement | None" = None, **kwargs):
    """cls.from_pretrained, quietly, placed on the device; failures become one-line errors.
    Models (those given a placement) load from safetensors only, never from a pickle."""
    if placement is not None:
        refuse_pickled_weights(Path(path) / kwargs.get("subfolder", ""))
        kwargs = {**kwargs, "use_safetensors": True}
    with _quiet():
        try:
            model = cls.from_pretrained(str(path), **kwargs)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            where = f"{path}/{kwargs['subfolder']}" if "subfolder" in kwargs else str(path)
            raise VermouthError(f"cannot load {cls.__name__} from {where}: {msg[:300]}") from None
        if placement is not None:
            model = fast_layout(model.to(placement.device, placement.dtype).eval().requires_grad_(False))
        return model


def fast_layout(model):
    """Convolution weights channels-last on CUDA, where cuDNN's tensor-core kernels want NHWC (the inputs
    follow: `device_layout`); the CPU keeps the layout its stored bytes were made with."""
    if next(model.parameters()).device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def device_layout(x: torch.Tensor) -> torch.Tensor:
    """A 4-D model input channels-last on CUDA, like the models (`fast_layout`)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cuda" and x.dim() == 4 else x


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise VermouthError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VermouthError(f"device {device!r} requested but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise VermouthError(f"unsupported device {device!r} (use cpu, cuda or cuda:N)")
    return dev


_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = ("auto", *_PRECISIONS)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """Compute dtype: fp32 on the CPU, fp16 on CUDA unless asked otherwise."""
    if precision == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if precision not in _PRECISIONS:
        raise VermouthError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if device.type == "cpu" and precision != "fp32":
        # features made in fp16 and in fp32 share a key (precision is how, not what): on the CPU,
        # where a store's bytes must not depend on how they were computed, only fp32 runs
        raise VermouthError(f"--precision {precision} is for CUDA: the CPU computes in fp32, and a store's bytes "
                            "must not depend on how they were computed")
    return _PRECISIONS[precision]


@dataclass
class Placement:
    device: torch.device
    dtype: torch.dtype

    def describe(self) -> dict:
        return {"device": str(self.device), "precision": str(self.dtype).replace("torch.", "")}


class Captioner:
    """A BLIP image-captioning model and its processor."""

    def __init__(self, spec: str, placement: Placement):
        self.spec = spec
        self.placement = placement
        self.dir = resolve_model_dir(spec, role="captioner", hub_patterns=["*.json", "*.txt", "*.safetensors"])

    @functools.cached_property
    def identity(self) -> str:
        return directory_identity(self.dir)

    @functools.cached_property
    def processor(self):
        from transformers import BlipProcessor

        return load_pretrained(BlipProcessor, self.dir)

    @functools.cached_property
    def model(self):
        from transformers import BlipForConditionalGeneration

        return load_pretrained(BlipForConditionalGeneration, self.dir, self.placement)


class Expert:
    """A frozen image backbone (ResNet, DINO ViT, DINOv2) whose multi-scale features are cached."""

    def __init__(self, name: str, spec: str | None, placement: Placement):
        if name not in EXPERT_MODELS:
            raise VermouthError(f"unknown expert {name!r} (choose from {', '.join(EXPERT_MODELS)})")
        self.name = name
        self.spec = spec or EXPERT_MODELS[name]
        self.placement = placement
        self.dir = resolve_model_dir(self.spec, role=f"expert {name}", hub_patterns=["*.json", "*.safetensors"])
        kind = config_model_type(self.dir)
        if kind != EXPERT_MODEL_TYPES[name]:
            raise VermouthError(f"expert {name}: {self.spec} is a {kind or 'model without a config.json model_type'}, "
                                f"not a {EXPERT_MODEL_TYPES[name]} model")

    @functools.cached_property
    def identity(self) -> str:
        return directory_identity(self.dir)

    @functools.cached_property
    def image_stats(self) -> tuple[list[float], list[float]]:
        """(mean, std) from the model's preprocessor config; ImageNet's when it has none."""
        cfg_path = self.dir / "preprocessor_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            if "image_mean" in cfg and "image_std" in cfg:
                return list(cfg["image_mean"]), list(cfg["image_std"])
        return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

    @functools.cached_property
    def model(self):
        from transformers import AutoModel

        return load_pretrained(AutoModel, self.dir, self.placement)

    @functools.cached_property
    def skeleton(self):
        """The expert built from its config on the meta device (shapes only)."""
        return skeleton(self.dir, "transformers")


def config_model_type(directory: Path) -> str | None:
    try:
        return json.loads((directory / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def skeleton(directory: Path, family: str):
    with _quiet(), torch.device("meta"):
        if family == "transformers":
            from transformers import AutoConfig, AutoModel

            return AutoModel.from_config(AutoConfig.from_pretrained(directory)).eval()
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(directory)).eval()
