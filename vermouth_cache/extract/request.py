"""What `extract` is asked to do: one frozen, validated declaration, the API's input and the CLI's options.

    req = ExtractRequest(dataset="imgs/", store="cache/", t=(100, 200), stages="mid,up")

Each field carries its type, default, help and rules (`Choices`, `AtLeast`); `vermouth-cache extract`
builds its options from them (cli/main.py), so a choice or a help text is written once, here. Bad
values are refused in one line (a VermouthError) before any model or image is touched.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.seg import LAYOUTS
from vermouth_cache.methods import DEFAULT_METHOD, METHODS, method_named
from vermouth_cache.methods.conditioning import CONDITIONINGS, conditioning_of
from vermouth_cache.models.backbones import DEFAULT_SD_MODEL
from vermouth_cache.models.backbones.base import TEXT_LAYERS
from vermouth_cache.models.loading import DEFAULT_CAPTIONER, EXPERT_MODELS, PRECISIONS
from vermouth_cache.models.noise import NOISE_MODES
from vermouth_cache.models.taps import BLOCK_ORDER, taps_for
from vermouth_cache.store.arrays import STORAGE_DTYPES
from vermouth_cache.store.codecs import CODEC_NAMES

PROMPT_MODES = tuple(c.name for c in CONDITIONINGS.values() if not c.syntax)
ON_ERROR = ("fail", "skip")
SCHEDULER_ADDRESS = re.compile(r"^(?:(?:tcp|tls|ucx|inproc)://)?[^\s:/]+:\d{1,5}$")
PROMPT_DEFAULT = "blip"  # of a method that takes captions; else the method's first conditioning


@dataclass(frozen=True)
class Choices:
    """The values a field takes, read when checked (a registry may have grown), and what an error calls it."""
    what: str
    values: Callable[[], Iterable[str]]

    def check(self, name: str, value) -> None:
        allowed = tuple(self.values())
        if value is not None and value not in allowed:
            raise VermouthError(f"unknown {self.what} {value!r} (choose from {', '.join(allowed)})")


@dataclass(frozen=True)
class AtLeast:
    minimum: int

    def check(self, name: str, value) -> None:
        if value is not None and value < self.minimum:
            raise VermouthError(f"{option_name(name)} must be at least {self.minimum}")


@dataclass(frozen=True)
class AtMost:
    maximum: int
    why: str

    def check(self, name: str, value) -> None:
        if value is not None and value > self.maximum:
            raise VermouthError(f"{option_name(name)} {value} exceeds {self.maximum} ({self.why})")


@dataclass(frozen=True)
class Cli:
    """How a field shows on the command line when not as `--name TYPE`."""
    argument: bool = False  # a positional argument
    option: bool = True  # False: not an option (`progress` is the command's --quiet)
    metavar: str | None = None


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _help(text: str) -> str:
    return " ".join(text.split())


def _method_defaults_help() -> str:
    """' A method's own values replace the defaults below: vpd: t 1, noise none, ...' for the --method help."""
    parts = []
    for m in METHODS.values():
        values = {**m.defaults, **m.fixed}
        if values:
            shown = ", ".join(f"{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, tuple) else v}"
                              for k, v in values.items())
            parts.append(f"{m.name}: {shown}")
    return (" A method's own values replace the defaults shown below (" + "; ".join(parts) + ").") if parts else ""


class ExtractRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: Annotated[str, Cli(argument=True)] = Field(description="The dataset: a folder, split file, manifest, "
                                                                    "segmentation root, depth root (NYU in the "
                                                                    "BTS/VPD layout) or REFER root.")
    store: str = Field(description="Store: a directory (local or shared), or an object-store URL such as "
                                   "s3://bucket/prefix (created if new).")
    image_root: str | None = Field(None, description="Image root for a CoOp split file or a manifest (default: "
                                                     "beside the file).")
    split: str | None = Field(None, description="Split of a CoOp split file or a manifest (train, val, test), or of a "
                                                "segmentation dataset.")
    # segmentation dataset layout (data.seg); None: detected or not one
    layout: Annotated[str | None, Choices("layout", lambda: LAYOUTS)] = Field(
        None, description="Segmentation dataset layout (default: detected when --split is given).")
    shots: int | None = Field(None, description="Extract only a K-shot-per-class subset (CoOp-style).")
    shot_seed: int = Field(0, description="Seed of the K-shot subset (and of a depth dataset's drawn views).")
    slide: bool = Field(False, description="Cache sliding windows of each image (crops of --resolution every 341 px "
                                           "of the image resized to a shorter side of --resolution) instead of its "
                                           "centre crop: for slide inference at native size (VPD's ADE20K test).")
    views: Annotated[int, AtLeast(1)] = Field(1, description="Drawn crops (each mirrored or not, seeded) per training "
                                                             "image of a depth dataset: the cache's stand-in for "
                                                             "VPD's per-step random crop and flip.")
    method: Annotated[str, Choices("method", lambda: METHODS)] = Field(
        DEFAULT_METHOD, description=_help("How features are made: " + "; ".join(m.summary for m in METHODS.values())
                                          + "." + _method_defaults_help()))
    t: tuple[int, ...] = Field((200,), description="Timestep(s) 0-999, comma-separated; one U-net pass each.")
    stages: str | None = Field(None, description="U-net stages to keep: any of down, mid, up [default: the method's, "
                                                 "mid,up for vermouth, unless --taps is given].")
    taps: str | None = Field(None, description=f"Blocks to keep, by name ({BLOCK_ORDER[0][:-1]}0-3, mid_block, "
                                               f"{BLOCK_ORDER[-1][:-1]}0-3); adds to --stages.")
    attn_maps: str | None = Field(None, description="Also keep cross-attention maps: of these stages (vermouth: up, "
                                                    "down, mid), or a32 / a64 / none (vpd: maps up to 32 or 64 px at "
                                                    "512, [a32]).")
    expert: Annotated[str | None, Choices("expert", lambda: EXPERT_MODELS)] = Field(
        None, description="Also cache this expert's multi-scale features.")
    expert_model: str | None = Field(None, description="Hub id or directory of the expert (default: the expert's "
                                                       "standard model).")
    sd_model: str = Field(DEFAULT_SD_MODEL, description="SD pipeline: hub id or diffusers directory.")
    captioner: str = Field(DEFAULT_CAPTIONER, description="BLIP captioner: hub id or directory.")
    prompt: str = Field(PROMPT_DEFAULT, description=_help("Caption source: " + ", ".join(c.help for c in CONDITIONINGS.values())
                                                  + "."))
    caption_prefix: str = Field("", description="Text BLIP continues (the official code used 'a picture of ').")
    caption_min_tokens: int = Field(5, description="BLIP minimum new tokens.")
    caption_max_tokens: Annotated[int, AtMost(256, "BLIP's text decoder has 512 positions")] = Field(
        20, description="BLIP maximum new tokens.")
    text_layer: Annotated[str, Choices("text layer", lambda: TEXT_LAYERS)] = Field(
        "final", description="CLIP text layer used as the condition.")
    text_tokens: Annotated[int | None, AtLeast(2)] = Field(
        None, description="Tokens of each text condition, padded, no mask (VPD refer: 40 RefCOCO/+, 77 G-Ref) "
                          "[the tokenizer's, 77].")
    context_table: Annotated[str | None, Cli(metavar="FILE")] = Field(
        None, description="Context table (.safetensors from `vermouth-cache tables`) of --prompt table / table-class; "
                          "its sha256 enters the key.")
    resolution: int = Field(256, description="Shorter side resized to this, then centre-cropped square; a multiple "
                                             "of 64 (256 classification/SBIR, 512 segmentation).")
    noise: Annotated[str, Choices("noise mode", lambda: NOISE_MODES)] = Field(
        "ddpm", description="How the latent reaches t: DDPM forward noise, DDIM inversion, or the clean latent.")
    seed: int = Field(0, description="Noise seed (and random-prompt seed).")
    noise_draws: Annotated[int, AtLeast(1), AtMost(1000, "U-net passes per sample")] = Field(1, description="Average the taps over K DDPM noise draws.")
    inversion_steps: Annotated[int, AtLeast(1), AtMost(1000, "the schedule has 1000 timesteps")] = Field(10, description="U-net calls of a DDIM inversion.")
    dtype: Annotated[str, Choices("dtype", lambda: STORAGE_DTYPES)] = Field("fp16", description="Storage dtype of "
                                                                                                "features.")
    codec: Annotated[str, Choices("codec", lambda: CODEC_NAMES)] = Field(
        "raw", description="How feature and expert chunks are stored: raw; zstd (lossless, Blosc zstd with byte "
                           "shuffle); int8 or fp8 (lossy: per sample and channel scale and offset stored beside "
                           "the values, decoded to float32). In the key.")
    batch_size: Annotated[int, AtLeast(1)] = Field(8, description="Images per model call on CUDA, within one shard "
                                                                  "(the CPU always uses 1: batching changes CPU "
                                                                  "rounding).")
    shard_size: Annotated[int, AtLeast(1)] = Field(64, description="Samples per shard (= Zarr chunk) of NEW entries; "
                                                                   "an existing entry keeps its own.")
    device: str | None = Field(None, description="cpu, cuda or cuda:N (default: cuda when present).")
    precision: Annotated[str, Choices("precision", lambda: PRECISIONS)] = Field(
        "auto", description="Compute dtype (auto: fp32 on CPU, fp16 on CUDA); recorded per shard.")
    compile: bool = Field(False, description="torch.compile the U-net's layers (CUDA only; the first batches pay the "
                                             "compile time). Recorded per shard.")
    on_error: Annotated[str, Choices("--on-error", lambda: ON_ERROR)] = Field(
        "fail", description="On an unreadable image: stop, or record it per sample and go on.")
    # with it, bad images are skipped; more than this share fails the run
    max_error_rate: float | None = Field(None, description="Skip unreadable images (recorded per sample) but fail the "
                                                           "run, after finishing the rest, when more than this share of "
                                                           "the dataset failed, e.g. 0.01.")
    # None: every core of this machine
    cpu_threads: Annotated[int | None, AtLeast(1)] = Field(
        None, description="torch threads of CPU model calls, in this process and every worker [all cores]. CPU results "
                          "round differently with another count; recorded per shard.")
    # None: this process
    workers: Annotated[int | None, AtLeast(1)] = Field(None, description="Spread the shards over N local dask worker "
                                                                         "processes (one GPU each).")
    scheduler: Annotated[str | None, Cli(metavar="ADDRESS")] = Field(
        None, description="Spread the shards over the dask cluster at tcp://HOST:PORT (dataset and store must be at the "
                          "same path or URL on every worker).")
    progress: Annotated[bool, Cli(option=False)] = Field(True, description="Progress bars.")

    # how the work is run, not what it computes: left out of the request a manifest keeps
    RUN_ONLY: ClassVar[tuple[str, ...]] = ("store", "progress", "workers", "scheduler", "compile")

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except ValidationError as exc:  # a type pydantic could not read: one line naming the option
            err = exc.errors()[0]
            name = str(err["loc"][0]) if err["loc"] else "request"
            if err["type"] == "extra_forbidden":
                raise VermouthError(f"ExtractRequest has no field {name!r}") from None
            raise VermouthError(f"{option_name(name)}: {err['msg']} (got {err.get('input')!r})") from None

    @classmethod
    def method_defaults(cls, method: str) -> dict:
        """What `extract --method METHOD` makes when given nothing else: t, noise, prompt, taps or
        stages, attention maps, resolution and expert (the defaults a head of its features starts from)."""
        data = cls._method_defaults({"method": method})
        fields = ("t", "noise", "prompt", "stages", "taps", "attn_maps", "resolution", "expert")
        return {k: data.get(k, cls.model_fields[k].default) for k in fields}

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data):
        """The method's fixed fields where not given, and its taps where neither stages nor taps are."""
        if not isinstance(data, dict):
            return data
        method = method_named(data.get("method", DEFAULT_METHOD))
        data = {**{k: v for k, v in {**method.defaults, **method.fixed}.items() if data.get(k) is None}, **{
            k: v for k, v in data.items() if v is not None}}
        if data.get("stages") is None and data.get("taps") is None:
            data["taps" if method.default_taps else "stages"] = method.default_taps or method.default_stages
        if data.get("prompt") is None and PROMPT_DEFAULT not in method.conditionings:
            # a method without captions: its first conditioning that needs no argument
            data["prompt"] = next(c for c in method.conditionings if not CONDITIONINGS[c].syntax)
        return data

    @field_validator("t", mode="before")
    @classmethod
    def _timesteps(cls, t):
        if isinstance(t, str):
            try:
                t = [int(v) for v in t.split(",") if v.strip()]
            except ValueError:
                raise VermouthError(f"--t takes whole numbers separated by commas, got {t!r}") from None
        t = (t,) if isinstance(t, int) else tuple(t)
        if not t:
            raise VermouthError("no timestep given (--t)")
        for v in t:
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 999:
                raise VermouthError(f"timestep {v!r} is outside 0-999")
        return tuple(sorted(set(t)))

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt):
        if prompt.startswith("text:") and not prompt[len("text:"):].strip():
            raise VermouthError("--prompt text: needs a text after the colon (the empty prompt is --prompt null)")
        if conditioning_of(prompt) is None:
            raise VermouthError(f"unknown prompt mode {prompt!r} (choose from {', '.join(PROMPT_MODES)}, or "
                                f"{', '.join(c.syntax for c in CONDITIONINGS.values() if c.syntax)})")
        return prompt

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, r):
        if r < 64 or r % 64:
            raise VermouthError(f"--resolution {r} must be a multiple of 64")
        return r

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, address):
        if address is not None and not SCHEDULER_ADDRESS.match(address):
            raise VermouthError(f"--scheduler {address!r} is not a dask scheduler address (tcp://HOST:PORT)")
        return address

    @field_validator("max_error_rate")
    @classmethod
    def _error_rate(cls, rate):
        if rate is not None and not 0 <= rate <= 1:
            raise VermouthError(f"--max-error-rate {rate} must lie in 0-1 (a share of the images)")
        return rate

    @field_validator("*")
    @classmethod
    def _declared_rules(cls, value, info):
        for rule in cls.model_fields[info.field_name].metadata:
            if isinstance(rule, (Choices, AtLeast, AtMost)):
                rule.check(info.field_name, value)
        return value

    @model_validator(mode="after")
    def _consistent(self):
        """The rules between fields, and between the request and its method."""
        method = method_named(self.method)
        method.check_fixed(self.__dict__)
        taps_for(self.stages, self.taps, layers=method.taps.layers)
        if self.attn_maps is not None and not self.attn_maps.strip():
            raise VermouthError("--attn-maps is empty: give the maps to keep, or none")
        if self.attn_maps:
            try:
                method.attention.check(self.attn_maps)
            except VermouthError as exc:
                raise VermouthError(f"--attn-maps: {exc}") from None
        if self.expert_model and not self.expert:
            raise VermouthError("--expert-model needs --expert")
        if conditioning_of(self.prompt).name not in method.conditionings:
            raise VermouthError(f"method {method.name} takes no --prompt {self.prompt!r} (it takes "
                                f"{', '.join(method.conditionings)})")
        cond = conditioning_of(self.prompt)
        if cond.needs_table and self.text_tokens is not None:
            raise VermouthError(f"--text-tokens sets the length of tokenized texts; --prompt {self.prompt} reads table "
                                "rows")
        if cond.needs_table and self.text_layer != type(self).model_fields["text_layer"].default:
            raise VermouthError(f"--text-layer picks a layer of the text encoder; --prompt {self.prompt} reads table "
                                "rows (made by `vermouth-cache tables make`)")
        if cond.needs_table != bool(self.context_table):
            raise VermouthError(f"--prompt {self.prompt} needs --context-table" if cond.needs_table else
                                f"--context-table is read by --prompt table or table-class, not {self.prompt!r}")
        if self.noise != "ddpm" and self.noise_draws != 1:
            raise VermouthError(f"--noise-draws averages random draws; noise mode {self.noise!r} has none")
        if not 0 <= self.caption_min_tokens <= self.caption_max_tokens:
            raise VermouthError("caption token limits need 0 <= min <= max")
        if self.workers and self.scheduler:
            raise VermouthError("give --workers (a local cluster) or --scheduler (a running one), not both")
        return self

    @property
    def block_taps(self) -> tuple[str, ...]:
        """The U-net taps asked for (stages expanded, explicit taps added), block by block in execution order."""
        return taps_for(self.stages, self.taps, layers=method_named(self.method).taps.layers)

    @classmethod
    def check_value(cls, name: str, value) -> None:
        """Check one field's value alone (its type and declared rules), as a recipe's `extract:` gives it."""
        from pydantic import TypeAdapter

        field = cls.model_fields[name]
        try:
            TypeAdapter(field.annotation).validate_python(value)
        except ValidationError as exc:
            raise VermouthError(f"{option_name(name)}: {exc.errors()[0]['msg']} (got {value!r})") from None
        for rule in field.metadata:
            if isinstance(rule, (Choices, AtLeast, AtMost)):
                rule.check(name, value)

    def load_dataset(self):
        """The dataset this request names (data.datasets.load_dataset with its dataset options)."""
        from vermouth_cache.data.datasets import load_dataset

        return load_dataset(self.dataset, image_root=self.image_root, split=self.split, shots=self.shots,
                            shot_seed=self.shot_seed, layout=self.layout, views=self.views,
                            slide=self.resolution if self.slide else None)

    def with_(self, **changes) -> "ExtractRequest":
        """A copy with `changes`, validated again."""
        return type(self)(**{**self.model_dump(), **changes})

    def to_json(self) -> dict:
        """The fields that say what to compute, as JSON (kept in manifests for `repair`)."""
        d = self.model_dump(exclude=set(self.RUN_ONLY))
        d["t"] = list(self.t)
        # `repair` may run from any directory: keep the paths it needs absolute (a relative
        # DATASET typed in one directory is another path, or none, in the next)
        for k in ("dataset", "image_root", "context_table"):
            if d.get(k) is not None:
                d[k] = _absolute(d[k])
        for k in ("sd_model", "captioner", "expert_model"):  # hub ids stay as typed
            if d.get(k) is not None and os.path.exists(os.path.expanduser(d[k])):
                d[k] = _absolute(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict, **overrides) -> "ExtractRequest":
        kw = {k: v for k, v in d.items() if k in cls.model_fields}
        kw["t"] = tuple(kw.get("t", (200,)))
        return cls(**{**kw, **overrides})


def _absolute(path: str) -> str:
    """The absolute form of a local path, normalised lexically like `datasets.load_dataset` does
    (symlinks kept); URLs (scheme://) as given."""
    if "://" in str(path):
        return str(path)
    return os.path.abspath(os.path.expanduser(os.fspath(path)))
