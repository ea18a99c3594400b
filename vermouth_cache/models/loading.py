"""Loading the frozen models the way users load them, and naming them by their bytes.

Every model is a hub id or a local directory, loaded with diffusers/transformers
`from_pretrained`; a hub id is first resolved to a local snapshot so that its files can be
hashed. A component's identity is the sha256 of the files `from_pretrained` reads (configs,
tokenizer files, the non-variant weights), so a renamed copy shares a cache and a fine-tuned one
does not. Components load lazily: a run that only needs the U-net never reads the VAE.
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

DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"  # CLIP with projection, for class-prompt features
EXPERT_MODELS = {
    "resnet18": "microsoft/resnet-18",
    "dino": "facebook/dino-vitb16",
    "dinov2": "facebook/dinov2-base",
}

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Files from_pretrained reads; weight variants (fp16, non-EMA) and other frameworks are not.
_READ_PATTERNS = ("*.json", "*.txt", "*.model", "*.safetensors", "*.bin")
_VARIANT_PATTERNS = ("*.fp16.*", "*.non_ema.*", "*.ema.*", "*.bf16.*", "*.msgpack", "*.onnx", "*.h5")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Scheduler fields that define alphas_cumprod (DDPMScheduler.__init__); with prediction_type, the
# only scheduler facts a feature can depend on.
SCHEDULE_FIELDS = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "trained_betas",
                   "rescale_betas_zero_snr")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_CONFIG_PATTERNS = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json"]
# U-net conditionings besides the text states and the timestep: each needs inputs this tool never makes
_EXTRA_CONDITIONS = ("addition_embed_type", "encoder_hid_dim", "encoder_hid_dim_type", "class_embed_type",
                     "num_class_embeds")
SUPPORTED_PIPELINES = ("vermouth-cache supports Stable Diffusion 1.x/2.x pipelines: one CLIP text encoder and a "
                       "UNet2DConditionModel conditioned on its text states and the timestep alone (epsilon, "
                       "v_prediction or sample prediction); SDXL, unCLIP, upscaling, inpainting and depth "
                       "U-nets are not")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def check_supported_pipeline(spec: str, directory: Path) -> None:
    """Refuse, from the configs alone, a pipeline whose U-net needs inputs other than the latent,
    the timestep and one CLIP text encoder's states (SDXL's added text/time embeddings and second
    text encoder, class or image embeddings, extra input channels). Called before any work."""
    index = _json(directory / "model_index.json")
    unet = _json(directory / "unet" / "config.json")
    reasons = []
    extra = [k for k, v in index.items()
             if k in ("text_encoder_2", "tokenizer_2", "image_encoder", "image_normalizer", "image_noising_scheduler",
                      "low_res_scheduler", "prior", "depth_estimator")
             and isinstance(v, list) and v and v[0] is not None]
    if extra:
        reasons.append("it has " + ", ".join(extra))
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        reasons.append(f"its U-net is a {unet['_class_name']}")
    conds = [f"{k}={unet[k]!r}" for k in _EXTRA_CONDITIONS if unet.get(k) is not None]
    if conds:
        reasons.append("its U-net needs added conditions (" + ", ".join(conds) + ")")
    vae_channels = _json(directory / "vae" / "config.json").get("latent_channels", 4)
    if unet and unet.get("in_channels", 4) != vae_channels:
        reasons.append(f"its U-net takes {unet.get('in_channels', 4)} input channels, not the VAE's {vae_channels}")
    text_width = _json(directory / "text_encoder" / "config.json").get("hidden_size")
    cross = unet.get("cross_attention_dim")
    cross = set(cross) if isinstance(cross, list) else {cross}
    if text_width is not None and unet and cross != {text_width} and "text_encoder_2" not in extra:
        reasons.append(f"its U-net attends to {'/'.join(map(str, sorted(cross, key=str)))}-wide text states, "
                       f"its text encoder gives {text_width}")
    if reasons:
        kind = "an SDXL pipeline" if unet.get("addition_embed_type") == "text_time" or "text_encoder_2" in extra \
            else "not a pipeline this tool can run"
        raise VermouthError(f"SD model {spec!r} is {kind}: {'; '.join(reasons)}. {SUPPORTED_PIPELINES}")


def resolve_model_dir(spec: str, *, role: str, hub_patterns: list[str]) -> Path:
    """A local directory for `spec`: the directory itself, or a hub snapshot of the files needed."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise VermouthError(f"{role} {spec!r} is a file, not a model directory")
    if not _HUB_ID.match(spec):
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


def _load(cls, path: Path, placement: "Placement | None" = None, **kwargs):
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
            model = model.to(placement.device, placement.dtype).eval().requires_grad_(False)
        return model


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


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """Compute dtype: fp32 on the CPU, fp16 on CUDA unless asked otherwise."""
    if precision == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if precision not in _PRECISIONS:
        raise VermouthError(f"unknown precision {precision!r} (use auto, fp32, fp16 or bf16)")
    return _PRECISIONS[precision]


@dataclass
class Placement:
    device: torch.device
    dtype: torch.dtype

    def describe(self) -> dict:
        return {"device": str(self.device), "precision": str(self.dtype).replace("torch.", "")}


class StableDiffusion:
    """The SD pipeline's components, each loaded on first use and hashed by its files."""

    def __init__(self, spec: str, placement: Placement):
        self.spec = spec
        self.placement = placement
        self._identities: dict[str, str] = {}
        if not Path(spec).expanduser().exists() and _HUB_ID.match(spec):
            # a hub pipeline: its configs first, so an unsupported one (SDXL, ...) is refused
            # before gigabytes of weights are fetched
            check_supported_pipeline(spec, resolve_model_dir(spec, role="SD model", hub_patterns=_CONFIG_PATTERNS))
        self.dir = resolve_model_dir(
            spec,
            role="SD model",
            hub_patterns=["model_index.json"] + [f"{c}/*" for c in SD_COMPONENTS],
        )
        if not (self.dir / "model_index.json").is_file():
            raise VermouthError(f"SD model {spec!r} is not a diffusers pipeline directory (no model_index.json)")
        for comp in SD_COMPONENTS:
            if not (self.dir / comp).is_dir():
                raise VermouthError(f"SD model {spec!r} has no {comp}/ folder")
        check_supported_pipeline(spec, self.dir)

    def identity(self, component: str) -> str:
        # a per-instance memo: functools.cache on a method would keep every instance (and its
        # loaded models) alive for the life of the process
        if component not in self._identities:
            self._identities[component] = directory_identity(self.dir / component)
        return self._identities[component]

    @functools.cached_property
    def unet(self):
        from diffusers import UNet2DConditionModel

        return _load(UNet2DConditionModel, self.dir, self.placement, subfolder="unet")

    @functools.cached_property
    def unet_skeleton(self):
        """The U-net built from its config on the meta device: its structure and output shapes,
        without reading (or allocating) a weight."""
        return _skeleton(self.dir / "unet", "diffusers:UNet2DConditionModel")

    def config(self, component: str) -> dict:
        return json.loads((self.dir / component / "config.json").read_text())

    @functools.cached_property
    def vae(self):
        from diffusers import AutoencoderKL

        return _load(AutoencoderKL, self.dir, self.placement, subfolder="vae")

    @functools.cached_property
    def text_encoder(self):
        from transformers import CLIPTextModel

        return _load(CLIPTextModel, self.dir, self.placement, subfolder="text_encoder")

    @functools.cached_property
    def tokenizer(self):
        from transformers import CLIPTokenizer

        return _load(CLIPTokenizer, self.dir, subfolder="tokenizer")

    @functools.cached_property
    def scheduler(self):
        # SD 1.5 ships a PNDM config, SD 2.x a DDIM one: whatever the class, only the fields that
        # define alphas_cumprod (forward noising, inversion) and prediction_type (what the U-net's
        # output means, read by DDIM inversion) are used, and DDPMScheduler reads them all.
        from diffusers import DDPMScheduler

        return _load(DDPMScheduler, self.dir, subfolder="scheduler")

    def schedule_recipe(self, noise: str) -> dict:
        """The scheduler fields that can change a feature under noise mode `noise`: those that
        define alphas_cumprod, plus prediction_type when DDIM inversion reads the U-net's output.
        (timestep_spacing, steps_offset, clip_sample, thresholding, variance_type: never used, as
        the inversion builds its own timesteps and never clips its x0.)"""
        cfg = self.scheduler.config
        recipe = {k: cfg[k] for k in SCHEDULE_FIELDS if k in cfg}
        if noise == "ddim-inversion":
            recipe["prediction_type"] = self.prediction_type
        return recipe

    @property
    def prediction_type(self) -> str:
        """What the U-net predicts (epsilon, v_prediction or sample), from the scheduler config."""
        kind = self.scheduler.config.get("prediction_type", "epsilon")
        if kind not in PREDICTION_TYPES:
            raise VermouthError(f"SD model {self.spec!r}: scheduler prediction_type {kind!r} is not supported by "
                                f"--noise ddim-inversion (supported: {', '.join(PREDICTION_TYPES)})")
        return kind

    def check_taps(self, taps) -> None:
        """Every block tap asked for exists in this U-net (a U-net with fewer blocks than SD's
        four down, one mid and four up ones, say), checked from its config before any work."""
        from vermouth_cache.models.taps import unet_blocks

        have = unet_blocks(self.config("unet"))
        missing = [tp for tp in taps if tp not in have]
        if missing:
            listed = ", ".join(have) if have else "none"
            raise VermouthError(f"SD model {self.spec!r}: its U-net has no {', '.join(missing)} (its blocks: {listed}); "
                                f"choose --stages/--taps among those")

    def check_timesteps(self, ts) -> None:
        n = self.scheduler.config.num_train_timesteps
        bad = [t for t in ts if t >= n]
        if bad:
            raise VermouthError(f"timestep {bad[0]} is outside the SD model's schedule (0-{n - 1})")


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

        return _load(BlipProcessor, self.dir)

    @functools.cached_property
    def model(self):
        from transformers import BlipForConditionalGeneration

        return _load(BlipForConditionalGeneration, self.dir, self.placement)


class Expert:
    """A frozen image backbone (ResNet, DINO ViT, DINOv2) whose multi-scale features are cached."""

    def __init__(self, name: str, spec: str | None, placement: Placement):
        if name not in EXPERT_MODELS:
            raise VermouthError(f"unknown expert {name!r} (choose from {', '.join(EXPERT_MODELS)})")
        self.name = name
        self.spec = spec or EXPERT_MODELS[name]
        self.placement = placement
        self.dir = resolve_model_dir(self.spec, role=f"expert {name}", hub_patterns=["*.json", "*.safetensors"])

    @functools.cached_property
    def identity(self) -> str:
        return directory_identity(self.dir)

    @functools.cached_property
    def image_stats(self) -> tuple[list[float], list[float]]:
        """(mean, std) from the model's preprocessor config; ImageNet's when it has none."""
        import json

        cfg_path = self.dir / "preprocessor_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            if "image_mean" in cfg and "image_std" in cfg:
                return list(cfg["image_mean"]), list(cfg["image_std"])
        return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

    @functools.cached_property
    def model(self):
        from transformers import AutoModel

        return _load(AutoModel, self.dir, self.placement)

    @functools.cached_property
    def skeleton(self):
        """The expert built from its config on the meta device (shapes only)."""
        return _skeleton(self.dir, "transformers")


def _skeleton(directory: Path, family: str):
    with _quiet(), torch.device("meta"):
        if family == "transformers":
            from transformers import AutoConfig, AutoModel

            return AutoModel.from_config(AutoConfig.from_pretrained(directory)).eval()
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(directory)).eval()
