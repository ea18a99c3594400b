"""How cached taps become the 4-level pyramid a head consumes (PAPER.md section 2).

Levels run from low to high resolution, [m, 2m, 4m, 8m] with m the mid block's size (8 at a 512
input, 4 at 256). The stage merges are the official code's `UnetFeatureExtractor.post_process`
(develop-productivity/Vermouth, src/model/unet.py), written as a table: each level lists the taps
resized (bilinear, align_corners=False, as the official interpolate) to the level's size and then
concatenated, except the all-stages lowest level, which the official code AVERAGES.

    stages      level 0 (m)            level 1 (2m)       level 2 (4m)       level 3 (8m)
    down        down3                  down2 (up x2)      down1 (up x2)      down0 (up x2)
    up          up0 (down x2)          up1 (down x2)      up2 (down x2)      up3
    mid         mid                    -                  -                  -
    down,mid    mid                    down2 (up x2)      down1 (up x2)      down0 (up x2)
    mid,up      mid                    up0                up1                cat(up2, up3)
    down,mid,up mean(down2,down3,mid)  cat(down1, up0)    cat(down0, up1)    cat(up2, up3)

down+up alone has no official merge and is refused. Cross-attention maps `attn.<block>` (77, h, w)
are concatenated to the level of the same size (the nearest one in log-size otherwise), as the
paper concatenates them with the features. Expert maps `expert.level0-3` (highest resolution
first) go, after their trainable adapters, to the pyramid levels in reverse order (expert level 3,
the coarsest, to pyramid level 0): `h = U-head([F_SD; F_exp])`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.models.taps import ATTN_PREFIX, parse_stages

MEAN = "mean"
MERGES: dict[tuple[str, ...], list[list[str]]] = {
    ("down",): [["down_blocks.3"], ["down_blocks.2"], ["down_blocks.1"], ["down_blocks.0"]],
    ("up",): [["up_blocks.0"], ["up_blocks.1"], ["up_blocks.2"], ["up_blocks.3"]],
    ("mid",): [["mid_block"]],
    ("down", "mid"): [["mid_block"], ["down_blocks.2"], ["down_blocks.1"], ["down_blocks.0"]],
    ("mid", "up"): [["mid_block"], ["up_blocks.0"], ["up_blocks.1"], ["up_blocks.2", "up_blocks.3"]],
    ("down", "mid", "up"): [[MEAN, "down_blocks.2", "down_blocks.3", "mid_block"],
                            ["down_blocks.1", "up_blocks.0"], ["down_blocks.0", "up_blocks.1"],
                            ["up_blocks.2", "up_blocks.3"]],
}
EXPERT_PREFIX = "expert.level"


def merge_plan(stages: str | Sequence[str]) -> list[list[str]]:
    key = parse_stages(stages)
    if key not in MERGES:
        raise VermouthError(f"stages {','.join(key)} have no pyramid merge "
                            f"(choose from {'; '.join(','.join(k) for k in MERGES)})")
    return MERGES[key]


def taps_needed(stages: str | Sequence[str]) -> list[str]:
    return sorted({tap for level in merge_plan(stages) for tap in level if tap != MEAN})


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def level_sizes(stages: str | Sequence[str], mid_size: int) -> list[int]:
    return [mid_size * 2**i for i in range(len(merge_plan(stages)))]


def merge_stages(taps: Mapping[str, torch.Tensor], stages: str | Sequence[str], mid_size: int) -> list[torch.Tensor]:
    """[(B, C_i, s_i, s_i)] for the pyramid levels, low resolution first."""
    out = []
    for level, size in zip(merge_plan(stages), level_sizes(stages, mid_size)):
        if level[0] == MEAN:
            out.append(sum(resize(taps[t], size) for t in level[1:]) / (len(level) - 1))
        else:
            parts = [resize(taps[t], size) for t in level]
            out.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return out


def nearest_level(size: int, sizes: Sequence[int]) -> int:
    return min(range(len(sizes)), key=lambda i: (abs(math.log2(sizes[i] / size)), i))


def attach(levels: list[torch.Tensor], extras: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Concatenate attention maps (by size) and adapted expert maps (by order) onto the levels."""
    sizes = [x.shape[-1] for x in levels]
    add: list[list[torch.Tensor]] = [[] for _ in levels]
    for name in sorted(extras):
        x = extras[name]
        if name.startswith(ATTN_PREFIX):
            i = nearest_level(x.shape[-1], sizes)
        elif name.startswith(EXPERT_PREFIX):
            i = 3 - int(name[len(EXPERT_PREFIX):])  # coarsest expert map (level3) -> pyramid level 0
            if i >= len(levels):
                continue  # a one-level (mid) pyramid takes only the coarsest expert map
        else:
            raise ValueError(name)
        add[i].append(resize(x, sizes[i]))
    return [torch.cat([lv, *a], dim=1) if a else lv for lv, a in zip(levels, add)]


def mid_size_of(shapes: Mapping[str, Sequence[int]]) -> int:
    """The mid block's spatial size from cached tap shapes (C, H, W) of any stage."""
    if "mid_block" in shapes:
        return shapes["mid_block"][-1]
    if "down_blocks.3" in shapes:
        return shapes["down_blocks.3"][-1]
    if "up_blocks.0" in shapes:
        return shapes["up_blocks.0"][-1] // 2
    raise VermouthError(f"cannot tell the pyramid size from taps {sorted(shapes)}")
