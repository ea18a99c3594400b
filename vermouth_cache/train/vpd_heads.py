"""VPD's heads, read from the authors' code (VPD.md section 2), on VPD's cached taps.

Every head takes the batch's taps and sees four levels, HIGH resolution first. VPD's own (`vpd_levels`):

    level 0  up_blocks.3                 (+ attn.level0 with A64)   1/8 of the image  (320 ch in SD 1.5)
    level 1  up_blocks.2.attentions.1    + attn.level1              1/16              (640 + N_ctx)
    level 2  up_blocks.1.attentions.1    + attn.level2              1/32              (1280 + N_ctx)
    level 3  up_blocks.0.resnets.1                                  1/64              (1280)

A head made with `stages` (e.g. "mid,up") reads Vermouth's features instead: the stage pyramid
of train/pyramid.py (levels m, 2m, 4m, 8m), reversed, so that the same head compares the two
methods' features on the same data (their strides, 1/64 to 1/8, are VPD's).

- `DepthHead` (depth/models_depth/model.py): level 0 through conv s2, GN(16), ReLU, conv s2 and
  level 1 through a conv s2 to 1/32, concatenated with level 2 and level 3 (nearest x2), a 1x1
  conv to 1536 + GN + ReLU, three [deconv k2 s2, BN, ReLU] of 32 channels, conv3x3 to 192 + BN +
  ReLU, bilinear x2 twice, conv3x3 + ReLU + conv3x3 to 1, sigmoid x max_depth. Widths scale by
  `width` (1.0: VPD's; the tests use a fraction on tiny models).
- `SimpleDecoding` (refer/lib/mask_predictor.py): hidden 640 (x width); up(level 3) ++ level 2 ->
  2 x [conv3x3, BN, ReLU]; up ++ level 1 -> same; up ++ level 0 -> same; 1x1 -> 2 logits at 1/8;
  ups bilinear align_corners=True.
- `SemanticFPN` (mmseg FPN + FPNHead, segmentation/configs): lateral 1x1 to 256, nearest top-down
  sum, 3x3 outputs; per level 1, 1, 2, 3 [conv3x3, BN, ReLU] stages with bilinear x2 between,
  summed at 1/8, dropout 0.1, 1x1 to the classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.methods.vpd import VPD_TAPS, attn_level_tap
from vermouth_cache.train.pyramid import merge_stages, mid_size_of

# VPD_TAPS is listed in U-net order (coarse first); levels run fine first
LEVEL_TAPS = tuple(reversed(VPD_TAPS))


def vpd_levels(batch: Mapping[str, torch.Tensor], with_attention: bool = True) -> list[torch.Tensor]:
    """The four levels, high resolution first: each tap, then the maps of its size when present."""
    out = []
    for level, tap in enumerate(LEVEL_TAPS):
        x = batch[tap]
        maps = batch.get(attn_level_tap(level)) if with_attention else None
        out.append(torch.cat([x, maps.to(x.dtype)], 1) if maps is not None else x)
    return out


def stage_levels(batch: Mapping[str, torch.Tensor], stages: str) -> list[torch.Tensor]:
    """Vermouth's stage pyramid of `stages`, high resolution first (its attention maps are not read)."""
    shapes = {k: tuple(v.shape[1:]) for k, v in batch.items() if torch.is_tensor(v) and v.dim() == 4}
    return list(reversed(merge_stages(batch, stages, mid_size_of(shapes))))


def pyramid_stages(s) -> str | None:
    """The stages whose pyramid a head of settings `s` reads: None for VPD's own levels."""
    from vermouth_cache.methods import method_named

    return s.stages if method_named(s.method).merge == "stages" else None


def level_channels(tap_shapes: Mapping[str, tuple], with_attention: bool = True,
                   stages: str | None = None) -> list[int]:
    """Channels of each level from the cached array shapes (per sample, (C, H, W))."""
    if stages is not None:
        # Vermouth's pyramid merge decides the channels: run it on shape-only (meta) tensors
        shapes_only = {k: torch.empty(1, *v, device="meta") for k, v in tap_shapes.items() if len(v) == 3}
        return [x.shape[1] for x in stage_levels(shapes_only, stages)]
    missing = [t for t in LEVEL_TAPS if t not in tap_shapes]
    if missing:
        raise VermouthError(f"a VPD head needs the cached taps {', '.join(missing)} (extract --method vpd)")
    out = []
    for level, tap in enumerate(LEVEL_TAPS):
        extra = tap_shapes.get(attn_level_tap(level)) if with_attention else None
        out.append(tap_shapes[tap][0] + (extra[0] if extra else 0))
    return out


@dataclass(frozen=True)
class VpdHeadSpec:
    """What rebuilds a VPD head from a run's head.safetensors (`train.runs.load_head`)."""
    kind: str  # "vpd-depth", "vpd-refer", "vpd-fpn"
    channels: list[int]
    width: float = 1.0
    options: dict = field(default_factory=dict)  # max_depth, n_classes
    stages: str | None = None  # Vermouth's stage pyramid instead of VPD's levels

    def to_json(self) -> dict:
        return asdict(self)

    def build(self) -> nn.Module:
        cls = {"vpd-depth": DepthHead, "vpd-refer": SimpleDecoding, "vpd-fpn": SemanticFPN}[self.kind]
        return cls(list(self.channels), width=self.width, stages=self.stages, **self.options)


def is_vpd_spec(spec: dict) -> bool:
    return str(spec.get("kind", "")).startswith("vpd-")


def levels_of(spec: VpdHeadSpec, batch, with_attention: bool = True) -> list[torch.Tensor]:
    return stage_levels(batch, spec.stages) if spec.stages else vpd_levels(batch, with_attention)


def _conv(i: int, o: int, k: int = 3, s: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(i, o, k, s, k // 2, bias=bias)


def _w(n: int, width: float, groups: int = 1) -> int:
    return max(groups, int(round(n * width / groups)) * groups)


class DepthHead(nn.Module):
    """VPD's depth decoder; `forward(batch, out_size)` -> (B, 1, h, w) metres in (0, max_depth)."""

    def __init__(self, channels: list[int], *, max_depth: float = 10.0, width: float = 1.0,
                 stages: str | None = None):
        super().__init__()
        self.spec = VpdHeadSpec("vpd-depth", list(channels), width, {"max_depth": max_depth}, stages)
        c0, c1, c2, c3 = channels
        self.max_depth = max_depth
        self.layer1 = nn.Sequential(_conv(c0, c0, s=2), nn.GroupNorm(16 if c0 % 16 == 0 else 1, c0), nn.ReLU(),
                                    _conv(c0, c0, s=2))
        self.layer2 = _conv(c1, c1, s=2)
        fused, deconv, last = _w(1536, width, 16), _w(32, width), _w(192, width)
        self.out_layer = nn.Sequential(nn.Conv2d(c0 + c1 + c2 + c3, fused, 1), nn.GroupNorm(16, fused), nn.ReLU())
        ups, cin = [], fused
        for _ in range(3):
            ups += [nn.ConvTranspose2d(cin, deconv, 2, 2, 0, bias=False), nn.BatchNorm2d(deconv), nn.ReLU()]
            cin = deconv
        self.deconv = nn.Sequential(*ups)
        self.conv = nn.Sequential(_conv(deconv, last), nn.BatchNorm2d(last), nn.ReLU())
        self.last = nn.Sequential(_conv(last, last), nn.ReLU(), _conv(last, 1))
        nn.init.normal_(self.last[-1].weight, std=1e-3)
        nn.init.zeros_(self.last[-1].bias)

    def forward(self, batch: Mapping[str, torch.Tensor], crop: int | None = None) -> torch.Tensor:
        f0, f1, f2, f3 = levels_of(self.spec, batch, with_attention=False)
        x = torch.cat([self.layer1(f0), self.layer2(f1), f2, F.interpolate(f3, scale_factor=2, mode="nearest")], 1)
        if crop is not None:  # a view smaller than the padded input: VPD crops 16 -> 15 at 1/32 for 480 in 512
            side = -(-crop // 32)
            x = x[..., :side, :side]
        x = self.conv(self.deconv(self.out_layer(x)))
        x = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)  # VPD: x2 twice
        return torch.sigmoid(self.last(x)) * self.max_depth


def silog_loss(pred: torch.Tensor, gt: torch.Tensor, lambd: float = 0.5) -> torch.Tensor:
    """VPD's SiLogLoss: d = log gt - log pred on gt > 0; sqrt(mean d^2 - lambda mean(d)^2)."""
    valid = gt > 0
    d = torch.log(gt[valid]) - torch.log(pred[valid])
    if d.numel() == 0:
        return pred.sum() * 0
    return torch.sqrt((d ** 2).mean() - lambd * d.mean() ** 2)


class SimpleDecoding(nn.Module):
    """VPD refer's mask predictor: 2 logits (background, object) at 1/8 of the input."""

    def __init__(self, channels: list[int], *, width: float = 1.0, stages: str | None = None):
        super().__init__()
        self.spec = VpdHeadSpec("vpd-refer", list(channels), width, stages=stages)
        c0, c1, c2, c3 = channels
        hidden = _w(640, width)

        def block(cin):
            return nn.Sequential(_conv(cin, hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
                                 _conv(hidden, hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())
        self.b16, self.b32, self.b64 = block(c3 + c2), block(hidden + c1), block(hidden + c0)
        self.cls = nn.Conv2d(hidden, 2, 1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x64, x32, x16, x8 = levels_of(self.spec, batch)

        def up(x, ref):
            return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=True)
        x = self.b16(torch.cat([up(x8, x16), x16], 1))
        x = self.b32(torch.cat([up(x, x32), x32], 1))
        x = self.b64(torch.cat([up(x, x64), x64], 1))
        return self.cls(x)


class SemanticFPN(nn.Module):
    """mmseg FPN(out 256, 4 outs) + FPNHead(channels 256, dropout 0.1): logits at 1/8 of the input."""

    def __init__(self, channels: list[int], n_classes: int, *, width: float = 1.0, stages: str | None = None):
        super().__init__()
        self.spec = VpdHeadSpec("vpd-fpn", list(channels), width, {"n_classes": n_classes}, stages)
        c = _w(256, width)
        self.lateral = nn.ModuleList(nn.Conv2d(ci, c, 1) for ci in channels)
        self.fpn_out = nn.ModuleList(_conv(c, c) for _ in channels)
        self.scale_heads = nn.ModuleList()
        for level in range(len(channels)):  # 1, 1, 2, 3 conv stages, bilinear x2 after each but the first level's
            stages = []
            for k in range(max(1, level)):
                stages += [_conv(c, c, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
                if level > 0:
                    stages.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*stages))
        self.dropout = nn.Dropout2d(0.1)
        self.cls = nn.Conv2d(c, n_classes, 1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        feats = levels_of(self.spec, batch)
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):  # top-down, nearest
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_out, lat)]
        x = self.scale_heads[0](outs[0])
        for head, o in zip(self.scale_heads[1:], outs[1:]):
            x = x + F.interpolate(head(o), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.cls(self.dropout(x))
