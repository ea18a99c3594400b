"""Backbones: the families of diffusion pipelines the extractor can run, picked from the configs.

    backbone = detect_backbone(spec, directory)   # SD1(), SD2(), or a one-line refusal (SDXL, ...)

One file per family: `sd1` (the default, Vermouth's), `sd2`, `sdxl` (recognised and refused).
A new backbone: a `Backbone` subclass in `backbones/<name>.py` (see `base`), added to BACKBONES
below; its `recognises` must exclude the others'.
"""

from __future__ import annotations

from pathlib import Path

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.models.backbones.base import Backbone, PipelineConfigs
from vermouth_cache.models.backbones.sd1 import SD1
from vermouth_cache.models.backbones.sd2 import SD2
from vermouth_cache.models.backbones.sdxl import SDXL

BACKBONES: tuple[Backbone, ...] = (SD1(), SD2(), SDXL())
DEFAULT_BACKBONE = BACKBONES[0]
DEFAULT_SD_MODEL = DEFAULT_BACKBONE.default_model
SUPPORTED = (f"vermouth-cache supports Stable Diffusion {'/'.join(b.version for b in BACKBONES if b.supported)} "
             "pipelines: one CLIP text encoder and a UNet2DConditionModel conditioned on its text states and the "
             "timestep alone (epsilon, v_prediction or sample prediction); SDXL, unCLIP, upscaling, inpainting and "
             "depth U-nets are not")


def detect_backbone(spec: str, directory: Path) -> Backbone:
    """The backbone of the pipeline in `directory` (its configs only: no weight is read), or a
    one-line VermouthError saying why this tool cannot run it."""
    cfg = PipelineConfigs.read(directory)
    claimed = [b for b in BACKBONES if b.recognises(cfg)]
    if len(claimed) > 1:  # a programming error in a backbone's `recognises`, not the user's
        raise RuntimeError(f"backbones {', '.join(b.name for b in claimed)} all claim {spec}")
    if not claimed:
        problems = cfg.problems() or ["its configs match no known backbone"]
        raise VermouthError(f"SD model {spec!r} is not a pipeline this tool can run: {'; '.join(problems)}. "
                            f"{SUPPORTED}")
    claimed[0].check(spec, cfg, SUPPORTED)
    return claimed[0]
