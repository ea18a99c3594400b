"""Training settings: one declaration of every field a head's training reads, frozen and checked.

Each task declares its defaults (the paper's Table 7, `Task.table7`) and its fast schedule
(`Task.fast`: classification 10 epochs instead of 100, segmentation 8k iterations instead of 120k);
`vermouth_cache.train.tasks.task_settings(task, schedule, **overrides)` resolves them. The field
descriptions below are the help of `vermouth-cache train TASK --OPTION`, the Literal types its
choices. Values the paper leaves open are marked and recorded in every run's config.json.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.vocab import template_sets
from vermouth_cache.extract.request import PROMPT_MODES, TEXT_LAYERS, ExtractRequest
from vermouth_cache.models.loading import EXPERT_MODELS
from vermouth_cache.models.noise import NOISE_MODES
from vermouth_cache.methods import method_named
from vermouth_cache.train.config import Declared, check_keys
from vermouth_cache.train.heads import HEAD_KINDS
from vermouth_cache.train.pyramid import merge_plan

SCHEDULES = ("paper", "fast")
# fields added with VPD (0.3): absent from config.json while they hold these values
LATER_DEFAULTS = {"method": "vermouth", "adapter": False, "tune_unet": False, "freeze_prompt_after": None,
                  "head_width": 1.0}
LR_SCHEDULES = ("none", "exponential", "polynomial")
ON_OFF = "on/off"  # a bool field offered as `--NAME on|off` (its default differs between tasks)
TASK_OWN = "task-own"  # a field only the tasks naming it in Task.own_settings offer as an option


class TaskSettings(Declared):
    # which cached features (extract options)
    method: str = Field("vermouth", description="Method of the cached features (`extract --method`): vermouth's "
                                                 "pyramid merges --stages; vpd's taps are its four hierarchical "
                                                 "outputs.")
    resolution: int = Field(description="Input resolution of the cached features.")
    t: int = Field(description="Timestep of the cached features.")
    stages: str | None = Field(None, description="U-net stages merged into the pyramid (vermouth): down, mid, up, "
                                                 "down,mid, mid,up or down,mid,up.")
    noise: Literal[NOISE_MODES] = Field(description="Noise mode of the cached features.")
    attn_maps: str | None = Field(description="Cached cross-attention maps joining the pyramid: a stage (vermouth), "
                                              "a32 or a64 (vpd), or none.")
    prompt: str = Field("blip", description=f"Prompt mode of the cached features: {', '.join(PROMPT_MODES)} or "
                                            "text:PROMPT.")
    text_layer: Literal[TEXT_LAYERS] = Field("final", description="Text layer of the cached condition.")
    expert: Literal[tuple(EXPERT_MODELS)] | None = Field(
        "resnet18", description="Adapted expert whose cached features join the pyramid, or none for the ablation.")
    # the classifier
    text_proj: bool = Field(False, description="Class-prompt features after (on) or before (off) CLIP's text "
                                               "projection.", json_schema_extra={"cli": ON_OFF})
    temperature: float = Field(0.2, description="Cosine-logit temperature of the text classifier.")
    templates: str | None = Field(None, description="Prompt template set from data/templates.json "
                                                    "(none: the dataset's own, else default).")
    # the head
    head: Literal[HEAD_KINDS] = Field("uhead", description="U-head, the ablation's baseline fusion (conv per level, "
                                                           "summed), or a linear probe.")
    # optimisation
    lr: float = Field(1e-5, description="AdamW learning rate.")
    lr_schedule: Literal[LR_SCHEDULES] = Field("none", description="Learning-rate schedule.")
    gamma: float = Field(0.9, description="Exponential schedule: lr * gamma ** epoch (not given in the paper).")
    power: float = Field(0.9, description="Polynomial schedule: lr * (1 - step / steps) ** power (mmseg's "
                                          "default; not given in the paper).")
    weight_decay: float = Field(5e-4, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, description="Gradient clipping, L2 norm.")
    batch_size: int = Field(64, description="Training batch.")
    epochs: int | None = Field(100, description="Training epochs (give epochs or iterations).")
    iters: int | None = Field(None, description="Training iterations (segmentation counts iterations).")
    eval_every: int = Field(1, description="Validate every N epochs (classification) or iterations "
                                           "(segmentation); validation picks the best.")
    seed: int = Field(0, description="Seed of the head's init and the batch order.")
    tune_norms: bool = Field(False, description="Train the U-net's norm layers too (the paper's setting): features "
                                                "are recomputed online from the cached latents, one U-net "
                                                "forward+backward per step; needs --sd-model.",
                             json_schema_extra={"cli": TASK_OWN})
    adapter: bool = Field(False, description="VPD online: train VPD's text adapter (c + gamma MLP(c), gamma 1e-4) "
                                             "with the head; features recomputed from the cached latents and text, "
                                             "one U-net forward+backward per step; needs --sd-model.",
                          json_schema_extra={"cli": TASK_OWN})
    tune_unet: bool = Field(False, description="VPD online: also train the U-net, at the task's lr multiplier (seg "
                                               "x0.1 with norms x1.0, depth x0.01, refer x1.0), gradient "
                                               "checkpointing on; needs --sd-model.", json_schema_extra={"cli": TASK_OWN})
    freeze_prompt_after: int | None = Field(None, description="Train the adapter online for N steps, store the "
                                                              "adapted context table, extract once with it and train "
                                                              "the head from the cache (a table conditioning).",
                                            json_schema_extra={"cli": TASK_OWN})
    head_width: float = Field(1.0, description="Width of a VPD head as a fraction of VPD's (1.0: depth 1536/192, "
                                               "refer 640, FPN 256 channels).", json_schema_extra={"cli": TASK_OWN})

    def to_json(self) -> dict:
        """The settings as config.json records them; the fields VPD added are left out while they hold
        their defaults, so a Vermouth run's config (and a sweep point's fingerprint) reads as before."""
        d = self.model_dump()
        return {k: v for k, v in d.items() if not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}

    def with_(self, **changes) -> "TaskSettings":
        """A copy with `changes` (None = keep), checked like the original."""
        check_keys(changes, tuple(type(self).model_fields), "settings")
        return type(self).parse({**self.to_json(), **{k: v for k, v in changes.items() if v is not None}})

    @field_validator("expert", "attn_maps", mode="before")
    @classmethod
    def _none_word(cls, value):
        return None if value == "none" else value  # the command line and recipes write None as "none"

    # Every field checked up front: a sweep must fail at its recipe, not hours into it.
    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if value not in PROMPT_MODES and not value.startswith("text:"):
            raise ValueError(f"unknown prompt mode {value!r} (choose from {', '.join(PROMPT_MODES)}, text:...)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TaskSettings":
        try:
            method = method_named(self.method)
            if method.merge == "stages":
                if self.stages is None:
                    raise VermouthError(f"method {self.method} merges stages: give stages")
                merge_plan(self.stages)
            else:  # Vermouth's head options do nothing on a method with its own taps and heads: refused, not ignored
                given = [name for name, value in (("stages", self.stages), ("head", self.head != "uhead"),
                                                  ("tune_norms", self.tune_norms)) if value]
                if given:
                    raise VermouthError(f"{', '.join(given)} choose Vermouth's pyramid and head; method "
                                        f"{self.method} reads its own taps into its own heads (--adapter and "
                                        "--tune-unet are its online modes)")
            if self.attn_maps:
                method.attention.check(self.attn_maps)
        except VermouthError as exc:
            raise ValueError(str(exc)) from None
        if self.resolution < 64 or self.resolution % 64:
            raise ValueError(f"resolution {self.resolution} must be a multiple of 64")
        if not 0 <= self.t <= 999:
            raise ValueError(f"timestep {self.t} is outside 0-999")
        for name in ("lr", "temperature", "gamma", "power", "weight_decay", "grad_clip"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0 or self.batch_size < 1 or self.temperature <= 0:
            raise ValueError("lr, batch size and temperature must be positive")
        if self.lr > 10:
            raise ValueError(f"lr {self.lr} is not a learning rate (above 10)")
        if self.weight_decay < 0 or self.grad_clip <= 0 or self.power < 0 or not 0 < self.gamma <= 1:
            raise ValueError("weight decay and power must be >= 0, grad clip > 0, gamma in (0, 1]")
        if self.templates is not None and self.templates.lower() not in template_sets():
            raise ValueError(f"unknown template set {self.templates!r} (choose from {', '.join(template_sets())})")
        if not (math.isfinite(self.head_width) and 0 < self.head_width <= 16):
            raise ValueError(f"head_width must be a finite fraction of VPD's width in (0, 16], got {self.head_width}")
        if self.freeze_prompt_after is not None and self.freeze_prompt_after > 100_000:
            raise ValueError(f"freeze_prompt_after {self.freeze_prompt_after} is more steps than any run here "
                             "(at most 100000)")
        if self.freeze_prompt_after is not None and (self.freeze_prompt_after < 1 or self.adapter or self.tune_unet):
            raise ValueError("freeze_prompt_after takes a number of steps >= 1, without adapter or tune_unet")
        if self.freeze_prompt_after is not None and self.prompt not in ("table", "table-class"):
            raise ValueError(f"freeze_prompt_after adapts a context table: prompt {self.prompt!r} reads none")
        if (self.adapter or self.tune_unet or self.freeze_prompt_after) and self.method != "vpd":
            raise ValueError("adapter, tune_unet and freeze_prompt_after are VPD's online modes: method vpd")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be at least 1, got {self.eval_every}")
        if (self.epochs is None) == (self.iters is None):
            raise ValueError("give exactly one of epochs and iterations")
        if (self.epochs is not None and self.epochs < 1) or (self.iters is not None and self.iters < 1):
            raise ValueError("epochs / iterations must be at least 1")
        return self


def resolve_settings(table7: TaskSettings, fast: dict, schedule: str = "paper", **overrides) -> TaskSettings:
    """`table7`, then `fast` if the schedule is "fast", then `overrides` (None = keep)."""
    if schedule not in SCHEDULES:
        raise VermouthError(f"unknown schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")
    s = table7.with_(**fast) if schedule == "fast" else table7
    method = overrides.get("method")
    if method is not None and method != s.method:
        s = _switched(s, method)
    return s.with_(**overrides)


def _switched(s: TaskSettings, method: str) -> TaskSettings:
    """`s` on another method's features: the feature fields become what `extract --method METHOD`
    makes by default (VPD on a Vermouth task: t=1, no noise, its taps, A32, a table prompt, no expert;
    Vermouth on a VPD task: t 200, DDPM noise, BLIP, mid,up), so `train seg --method vpd` reads the
    cache `extract --method vpd` wrote without restating every option."""
    try:
        made = ExtractRequest.method_defaults(method)
    except VermouthError:
        raise VermouthError(f"unknown method {method!r}") from None
    stages = made["stages"] if method_named(method).merge == "stages" else None
    return TaskSettings.parse({**s.to_json(), "method": method, "t": made["t"][0], "noise": made["noise"],
                               "prompt": made["prompt"], "stages": stages, "attn_maps": made["attn_maps"],
                               "expert": made["expert"] if stages is None else s.expert})


_MOVED = {"task_settings": "from vermouth_cache.train.tasks import task_settings",
          "TASKS": "from vermouth_cache.train.tasks import TASKS",
          "TABLE7": "vermouth_cache.train.tasks.get_task(NAME).table7",
          "FAST": "vermouth_cache.train.tasks.get_task(NAME).fast"}


def __getattr__(name: str):
    # The per-task tables moved into the task registry; an old import says where, not just "cannot import".
    if name in _MOVED:
        raise ImportError(f"vermouth_cache.train.settings.{name} moved with the task registry: {_MOVED[name]}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
