"""What `extract` is asked to do: one frozen, validated dataclass, the CLI's and the API's input."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.models.loading import DEFAULT_CAPTIONER, DEFAULT_SD_MODEL, EXPERT_MODELS
from vermouth_cache.models.noise import NOISE_MODES
from vermouth_cache.store.arrays import STORAGE_DTYPES
from vermouth_cache.models.taps import STAGES, parse_stages, taps_for

PROMPT_MODES = ("blip", "null", "random", "classname")
TEXT_LAYERS = ("final", "penultimate")
ON_ERROR = ("fail", "skip")
CLASSNAME_TEMPLATE = "a photo of a {}."
DEFAULT_STAGES = "mid,up"


@dataclass(frozen=True)
class ExtractRequest:
    dataset: str
    store: str
    image_root: str | None = None
    split: str | None = None
    layout: str | None = None  # segmentation dataset layout (seg_data); None: detected or not one
    shots: int | None = None
    shot_seed: int = 0
    t: tuple[int, ...] = (200,)
    stages: str | None = None  # mid,up when neither stages nor taps are given
    taps: str | None = None
    attn_maps: str | None = None
    expert: str | None = None
    expert_model: str | None = None
    sd_model: str = DEFAULT_SD_MODEL
    captioner: str = DEFAULT_CAPTIONER
    prompt: str = "blip"
    caption_prefix: str = ""
    caption_min_tokens: int = 5
    caption_max_tokens: int = 20
    text_layer: str = "final"
    resolution: int = 256
    noise: str = "ddpm"
    seed: int = 0
    noise_draws: int = 1
    inversion_steps: int = 10
    dtype: str = "fp16"
    batch_size: int = 8
    shard_size: int = 64
    device: str | None = None
    precision: str = "auto"
    on_error: str = "fail"
    max_error_rate: float | None = None  # with it, bad images are skipped; more than this share fails the run
    cpu_threads: int | None = None  # torch threads of CPU model calls; None: every core of this machine
    workers: int | None = None  # local dask workers (one device each); None: this process
    scheduler: str | None = None  # a running dask scheduler's address instead
    progress: bool = True
    block_taps: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self):
        """Refuse bad options before any model or image is touched."""
        if isinstance(self.t, int):
            object.__setattr__(self, "t", (self.t,))
        if not self.t:
            raise VermouthError("no timestep given (--t)")
        for t in self.t:
            if not isinstance(t, int) or not 0 <= t <= 999:
                raise VermouthError(f"timestep {t!r} is outside 0-999")
        object.__setattr__(self, "t", tuple(sorted(set(self.t))))
        if self.stages is None and self.taps is None:
            object.__setattr__(self, "stages", DEFAULT_STAGES)
        object.__setattr__(self, "block_taps", taps_for(self.stages, self.taps))
        if self.attn_maps:
            try:
                parse_stages(self.attn_maps)
            except VermouthError as exc:
                raise VermouthError(f"--attn-maps: {exc}") from None
        if self.expert is not None and self.expert not in EXPERT_MODELS:
            raise VermouthError(f"unknown expert {self.expert!r} (choose from {', '.join(EXPERT_MODELS)})")
        if self.expert_model and not self.expert:
            raise VermouthError("--expert-model needs --expert")
        if self.prompt not in PROMPT_MODES and not self.prompt.startswith("text:"):
            raise VermouthError(
                f"unknown prompt mode {self.prompt!r} (choose from {', '.join(PROMPT_MODES)}, or text:YOUR TEXT)"
            )
        if self.text_layer not in TEXT_LAYERS:
            raise VermouthError(f"unknown text layer {self.text_layer!r} (choose from {', '.join(TEXT_LAYERS)})")
        if self.noise not in NOISE_MODES:
            raise VermouthError(f"unknown noise mode {self.noise!r} (choose from {', '.join(NOISE_MODES)})")
        if self.noise_draws < 1:
            raise VermouthError("--noise-draws must be at least 1")
        if self.noise != "ddpm" and self.noise_draws != 1:
            raise VermouthError(f"--noise-draws averages random draws; noise mode {self.noise!r} has none")
        if self.inversion_steps < 1:
            raise VermouthError("--inversion-steps must be at least 1")
        if self.dtype not in STORAGE_DTYPES:
            raise VermouthError(f"unknown dtype {self.dtype!r} (choose from {', '.join(STORAGE_DTYPES)})")
        if self.resolution < 64 or self.resolution % 64:
            raise VermouthError(f"--resolution {self.resolution} must be a multiple of 64")
        if self.batch_size < 1 or self.shard_size < 1:
            raise VermouthError("--batch-size and --shard-size must be at least 1")
        if not 0 <= self.caption_min_tokens <= self.caption_max_tokens:
            raise VermouthError("caption token limits need 0 <= min <= max")
        if self.on_error not in ON_ERROR:
            raise VermouthError(f"unknown --on-error {self.on_error!r} (choose from fail, skip)")
        if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
            raise VermouthError(f"--max-error-rate {self.max_error_rate} must lie in 0-1 (a share of the images)")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise VermouthError("--cpu-threads must be at least 1")
        if self.workers is not None and self.workers < 1:
            raise VermouthError("--workers must be at least 1")
        if self.workers and self.scheduler:
            raise VermouthError("give --workers (a local cluster) or --scheduler (a running one), not both")

    def with_(self, **changes) -> "ExtractRequest":
        return replace(self, **changes)

    # how the work is run, not what it computes: left out of the request a manifest keeps
    RUN_ONLY = ("store", "progress", "workers", "scheduler")

    def to_json(self) -> dict:
        """The fields that say what to compute, as JSON (kept in manifests for `repair`)."""
        d = asdict(self)
        for k in (*self.RUN_ONLY, "block_taps"):
            d.pop(k, None)
        d["t"] = list(self.t)
        # `repair` may run from any directory: keep the paths it needs absolute (a relative
        # DATASET typed in one directory is another path, or none, in the next)
        for k in ("dataset", "image_root"):
            if d.get(k) is not None:
                d[k] = _absolute(d[k])
        for k in ("sd_model", "captioner", "expert_model"):  # hub ids stay as typed
            if d.get(k) is not None and os.path.exists(os.path.expanduser(d[k])):
                d[k] = _absolute(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict, **overrides) -> "ExtractRequest":
        known = {f.name for f in fields(cls) if f.init}
        kw = {k: v for k, v in d.items() if k in known}
        kw["t"] = tuple(kw.get("t", (200,)))
        return cls(**{**kw, **overrides})


def _absolute(path: str) -> str:
    """The absolute form of a local path, normalised lexically like `datasets.load_dataset` does
    (symlinks kept); URLs (scheme://) as given."""
    if "://" in str(path):
        return str(path)
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def stage_names() -> tuple[str, ...]:
    return tuple(STAGES)
