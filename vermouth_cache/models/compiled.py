"""`extract --compile`: the U-net's layers through torch.compile, hooks and early stop left as they are.

The taps (`taps.run_taps`) hook whole blocks and layers inside them and stop the pass by raising
from a hook, so the U-net's own forward is not compiled: each layer's `forward` is (ResNet blocks,
down- and up-samplers, transformers), and hooks, which wrap `forward`, run eagerly around it. A
transformer whose cross-attention is being recorded gets a new attention processor each pass, which
would recompile it every time: with attention maps asked for, transformers stay eager.

Compiled kernels (inductor) round differently from eager ones, and a CPU store's bytes must not
depend on how it was computed, so the CPU refuses it; `BACKEND` is what tests set to "eager" (the
same kernels as without compiling) to check that the compiled path stores the same bytes.
"""

from __future__ import annotations

import torch

from vermouth_cache.core.errors import VermouthError

BACKEND = "inductor"


def check_compile(device: torch.device) -> None:
    if device.type == "cpu" and BACKEND == "inductor":
        raise VermouthError("--compile is for CUDA: compiled CPU kernels round differently from eager ones, and a "
                            "store's bytes must not depend on how they were computed")


def compile_layers(unet, *, eager_transformers: bool) -> int:
    """Compile the forward of each of the U-net's layers in place; the number compiled."""
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    kinds: tuple[type, ...] = (ResnetBlock2D, Downsample2D, Upsample2D)
    if not eager_transformers:
        kinds += (Transformer2DModel,)
    n = 0
    for module in unet.modules():
        if isinstance(module, kinds):
            module.forward = torch.compile(module.forward, backend=BACKEND)
            n += 1
    return n
