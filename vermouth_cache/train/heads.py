"""The trainable heads on cached features: U-head, baseline fusion, linear probe, expert adapters,
and the text classifier (PAPER.md section 3).

    model = VermouthHead(HeadSpec(kind="uhead", flow="global", stages="mid,up", ...), out_dim=768)
    v = model(batch)           # global: (B, D); dense: (B, D, 8m, 8m)
    logits = TextClassifier(class_text, temperature=0.2)(v)

U-head (paper 3.3, official `SimpleFuse`/`SegSimpleFuse`/`FuseBlock`): one Conv -> GroupNorm -> SiLU
block per level; each level concatenates the re-sampled output of the previous level with its own
input, x~_i = [ReSample(f_{i-1}); x_i]. Global tasks fuse high resolution to low ("down-sample
flow", widths 1024/768/512/256 from low to high resolution as the official 'tiny' arch) and end
in CLIP's AttentionPool2d; dense tasks fuse low to high (width 256 everywhere, as the official
segmentation fuse) and end in a 1x1 conv. 1x1 convolutions everywhere by default: with them the
head has 8.46 M parameters at SD 1.5 scale (mid+up, 256 input, 768-d text), next to the paper's
8.6 M (`sd15_parameter_count`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.train.pyramid import EXPERT_PREFIX, attach, merge_stages, mid_size_of, resize, taps_needed

HEAD_KINDS = ("uhead", "baseline", "linear")
FLOWS = ("global", "dense")
GLOBAL_WIDTHS = (1024, 768, 512, 256)
DENSE_WIDTH = 256


@dataclass(frozen=True)
class HeadSpec:
    """Everything that fixes the head's architecture; saved in config.json and checkpoints."""
    kind: str  # uhead | baseline | linear
    flow: str  # global (classification, SBIR) | dense (segmentation)
    stages: str  # e.g. "mid,up"
    tap_shapes: dict  # cached tap name -> (C, H, W), attention maps included
    expert_shapes: dict  # expert.levelN -> (C, H, W); empty for --expert none
    kernel: int = 1
    heads: int = 8

    def to_json(self) -> dict:
        return {k: ({n: list(s) for n, s in v.items()} if isinstance(v, dict) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> "HeadSpec":
        d = dict(d)
        d["tap_shapes"] = {k: tuple(v) for k, v in d["tap_shapes"].items()}
        d["expert_shapes"] = {k: tuple(v) for k, v in d["expert_shapes"].items()}
        return cls(**d)


def conv_block(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
                         nn.GroupNorm(_groups(c_out), c_out), nn.SiLU())


def _groups(c: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling: the mean token (plus a learned position) attends over all
    positions; only its output is kept, so only its query is computed."""

    def __init__(self, spatial: int, dim: int, heads: int, out_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial * spatial + 1, dim) / dim**0.5)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, out_dim)
        b, c = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(1, keepdim=True), x], 1) + self.positional_embedding.to(x.dtype)
        split = lambda t: t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x[:, :1])), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, 1, C/heads)
        return self.c_proj(out.transpose(1, 2).reshape(b, c))


class UHead(nn.Module):
    def __init__(self, in_dims: Sequence[int], sizes: Sequence[int], out_dim: int, flow: str, kernel: int = 1,
                 heads: int = 8):
        super().__init__()
        n = len(in_dims)
        self.flow = flow
        if flow == "global":
            self.widths = list(GLOBAL_WIDTHS[:n])
            # high -> low resolution: level i also takes the resampled output of level i+1
            ins = [d + (self.widths[i + 1] if i + 1 < n else 0) for i, d in enumerate(in_dims)]
            self.end = AttentionPool2d(sizes[0], self.widths[0], heads, out_dim)
        else:
            self.widths = [DENSE_WIDTH] * n
            ins = [d + (self.widths[i - 1] if i > 0 else 0) for i, d in enumerate(in_dims)]
            self.end = nn.Conv2d(self.widths[-1], out_dim, 1)
        self.blocks = nn.ModuleList(conv_block(c, w, kernel) for c, w in zip(ins, self.widths))
        _init(self)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        order = range(len(levels) - 1, -1, -1) if self.flow == "global" else range(len(levels))
        f = None
        for i in order:
            x = levels[i] if f is None else torch.cat([resize(f, levels[i].shape[-1]), levels[i]], 1)
            f = self.blocks[i](x)
        return self.end(f)


class BaselineFusion(nn.Module):
    """The paper's ablation baseline: a conv on each level, resampled to one size, summed."""

    def __init__(self, in_dims: Sequence[int], sizes: Sequence[int], out_dim: int, flow: str, kernel: int = 1,
                 heads: int = 8):
        super().__init__()
        self.flow = flow
        width = GLOBAL_WIDTHS[0] if flow == "global" else DENSE_WIDTH
        self.size = sizes[0] if flow == "global" else sizes[-1]
        self.convs = nn.ModuleList(conv_block(c, width, kernel) for c in in_dims)
        self.end = AttentionPool2d(self.size, width, heads, out_dim) if flow == "global" else nn.Conv2d(width, out_dim, 1)
        _init(self)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return self.end(sum(resize(conv(x), self.size) for conv, x in zip(self.convs, levels)))


class LinearProbe(nn.Module):
    """Global: average-pool every level, concatenate, one linear map. Dense: every level resampled
    to the finest size, concatenated, one 1x1 conv (a per-pixel linear map)."""

    def __init__(self, in_dims: Sequence[int], sizes: Sequence[int], out_dim: int, flow: str, kernel: int = 1,
                 heads: int = 8):
        super().__init__()
        self.flow, self.size = flow, sizes[-1]
        self.end = nn.Linear(sum(in_dims), out_dim) if flow == "global" else nn.Conv2d(sum(in_dims), out_dim, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        if self.flow == "global":
            return self.end(torch.cat([x.mean((2, 3)) for x in levels], 1))
        return self.end(torch.cat([resize(x, self.size) for x in levels], 1))


FUSIONS = {"uhead": UHead, "baseline": BaselineFusion, "linear": LinearProbe}


class Adapter(nn.Module):
    """The official expert adapter: 1x1 conv to C/4, ReLU, 1x1 conv back to C."""

    def __init__(self, c: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(c, max(1, c // 4), 1, bias=False), nn.ReLU(),
                                 nn.Conv2d(max(1, c // 4), c, 1, bias=False))

    def forward(self, x):
        return self.net(x)


class VermouthHead(nn.Module):
    """Cached taps (+ attention maps, + adapted expert maps) -> pyramid -> fusion head."""

    def __init__(self, spec: HeadSpec, out_dim: int):
        super().__init__()
        if spec.kind not in FUSIONS:
            raise VermouthError(f"unknown head {spec.kind!r} (choose from {', '.join(HEAD_KINDS)})")
        if spec.flow not in FLOWS:
            raise ValueError(spec.flow)
        self.spec = spec
        missing = [t for t in taps_needed(spec.stages) if t not in spec.tap_shapes]
        if missing:
            raise VermouthError(f"stages {spec.stages} need cached taps {', '.join(missing)}")
        self.mid = mid_size_of(spec.tap_shapes)
        self.adapters = nn.ModuleDict({n.replace(".", "_"): Adapter(s[0]) for n, s in sorted(spec.expert_shapes.items())})
        dims, sizes = self._level_dims()
        self.fusion = FUSIONS[spec.kind](dims, sizes, out_dim, spec.flow, spec.kernel, spec.heads)

    @property
    def inputs(self) -> list[str]:
        """The cached arrays the head reads."""
        return sorted(self.spec.tap_shapes) + sorted(self.spec.expert_shapes)

    def _level_dims(self) -> tuple[list[int], list[int]]:
        with torch.no_grad():
            fake = {n: torch.zeros(1, *s) for n, s in {**self.spec.tap_shapes, **self.spec.expert_shapes}.items()}
            levels = self.pyramid(fake, adapt=False)
        return [x.shape[1] for x in levels], [x.shape[-1] for x in levels]

    def pyramid(self, batch: Mapping[str, torch.Tensor], adapt: bool = True) -> list[torch.Tensor]:
        levels = merge_stages(batch, self.spec.stages, self.mid)
        extras = {n: batch[n] for n in self.spec.tap_shapes if n.startswith("attn.")}
        for n in self.spec.expert_shapes:
            extras[n] = self.adapters[n.replace(".", "_")](batch[n]) if adapt else batch[n]
        return attach(levels, extras)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.fusion(self.pyramid(batch))


class TextClassifier(nn.Module):
    """logits = cos(v, text_c) / temperature, per vector (B, D) or per pixel (B, D, H, W)."""

    def __init__(self, class_text: torch.Tensor, temperature: float):
        super().__init__()
        self.register_buffer("text", F.normalize(class_text.float(), dim=-1), persistent=False)
        self.temperature = temperature

    @property
    def out_dim(self) -> int:
        return int(self.text.shape[1])

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        v = F.normalize(v, dim=1)
        if v.dim() == 2:
            return v @ self.text.T / self.temperature
        return torch.einsum("bdhw,cd->bchw", v, self.text) / self.temperature


class ClosedSet(nn.Module):
    """The logits of a head that predicts its training classes itself (VPD's Semantic FPN): no text."""

    temperature = None

    def __init__(self, n_classes: int):
        super().__init__()
        self.out_dim = n_classes

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def _init(module: nn.Module) -> None:
    # the official init: Kaiming-normal convs, N(0, 0.02) linears
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.02)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# SD 1.5 block outputs at a 256 input (latent 32): (C, H, W); attention maps are (77, H, W)
SD15_SHAPES_256 = {
    "down_blocks.0": (320, 16, 16), "down_blocks.1": (640, 8, 8), "down_blocks.2": (1280, 4, 4),
    "down_blocks.3": (1280, 4, 4), "mid_block": (1280, 4, 4), "up_blocks.0": (1280, 8, 8),
    "up_blocks.1": (1280, 16, 16), "up_blocks.2": (640, 32, 32), "up_blocks.3": (320, 32, 32),
}
RESNET18_SHAPES_256 = {"expert.level0": (64, 64, 64), "expert.level1": (128, 32, 32),
                       "expert.level2": (256, 16, 16), "expert.level3": (512, 8, 8)}


def sd15_parameter_count(kind: str = "uhead", flow: str = "global", stages: str = "mid,up", expert: bool = False,
                         out_dim: int = 768) -> int:
    """Trainable parameters of a head at SD 1.5 scale (256 input), for comparison with the paper."""
    taps = {t: SD15_SHAPES_256[t] for t in taps_needed(stages)}
    spec = HeadSpec(kind, flow, stages, taps, dict(RESNET18_SHAPES_256) if expert else {})
    return count_parameters(VermouthHead(spec, out_dim))


__all__ = ["HeadSpec", "VermouthHead", "TextClassifier", "count_parameters", "sd15_parameter_count", "EXPERT_PREFIX"]
