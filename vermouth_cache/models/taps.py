"""Which U-net outputs to keep, and one forward pass that keeps them and stops early.

Tap names follow diffusers' `UNet2DConditionModel` module names: `down_blocks.0`-`down_blocks.3`,
`mid_block`, `up_blocks.0`-`up_blocks.3`; a block tap is the block's OUTPUT (after its down/up-sampler),
as the official Vermouth code taps it. A tap may also name a layer inside a block
(`up_blocks.1.attentions.1`, `up_blocks.0.resnets.1`): that layer's output, for methods that tap
there. `attn.<block>` is the block's cross-attention probabilities softmax(QK^T/sqrt d), averaged
over heads and over the block's attention layers: (77, h, w) (`PerBlockMean`); a method may
aggregate the recorded probabilities another way (an `AttentionMaps` of its own).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.models.backbones import DEFAULT_BACKBONE
from vermouth_cache.models.backbones.base import unet_blocks
from vermouth_cache.models.loading import device_layout

# The names requests are checked against before any pipeline is read: the default backbone's (SD
# 1.x and 2.x share them); a pipeline's own blocks are checked once it is read (`check_taps`).
STAGES = DEFAULT_BACKBONE.stages
BLOCK_ORDER = STAGES["down"] + STAGES["mid"] + STAGES["up"]  # execution order in the forward pass
ATTN_PREFIX = "attn."


def block_of(tap: str) -> str:
    """The top-level block a tap lives in: "up_blocks.1.attentions.1" -> "up_blocks.1"."""
    parts = tap.split(".")
    return parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])


def parse_stages(stages: str | Iterable[str]) -> tuple[str, ...]:
    names = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages) if s.strip()]
    if not names:
        raise VermouthError("no stage given (choose from down, mid, up)")
    for name in names:
        if name not in STAGES:
            raise VermouthError(f"unknown stage {name!r} (choose from down, mid, up)")
    return tuple(s for s in STAGES if s in names)  # canonical order


def taps_for(stages: str | Iterable[str] | None, taps: str | Iterable[str] | None, *,
             layers: bool = False) -> tuple[str, ...]:
    """Taps from a stage list and/or explicit names, block by block in execution order; `layers`: a name may be
    a layer inside a block (checked against the U-net itself when it is read)."""
    chosen: set[str] = set()
    if stages:
        for stage in parse_stages(stages):
            chosen.update(STAGES[stage])
    if taps:
        for tap in [t.strip() for t in (taps.split(",") if isinstance(taps, str) else taps) if t.strip()]:
            if tap not in BLOCK_ORDER and not (layers and block_of(tap) in BLOCK_ORDER):
                raise VermouthError(f"unknown tap {tap!r} (choose from {', '.join(BLOCK_ORDER)}"
                                    + (", or a layer inside one, e.g. up_blocks.1.attentions.1)" if layers else ")"))
            chosen.add(tap)
    if not chosen:
        raise VermouthError("no U-net block selected (give --stages or --taps)")
    return tuple(sorted(chosen, key=lambda tp: (BLOCK_ORDER.index(block_of(tp)), tp != block_of(tp), tp)))


def blocks_with_cross_attention(unet) -> tuple[str, ...]:
    return tuple(b for b in unet_blocks(unet.config) if _cross_attentions(unet.get_submodule(b)))


def _cross_attentions(block) -> list:
    from diffusers.models.attention_processor import Attention

    return [m for name, m in block.named_modules() if name.endswith("attn2") and isinstance(m, Attention)]


class AttentionMaps:
    """How the recorded cross-attention probabilities become stored maps: a method's attention
    rule. `taps` names the maps `--attn-maps STAGES` asks for, `blocks` the blocks whose layers
    they read, `aggregate` turns the per-layer records into the maps."""

    name: str

    def check(self, selector: str) -> None:
        """Refuse an --attn-maps value this rule does not read."""
        parse_stages(selector)

    def taps(self, stages: str | Iterable[str] | None, with_cross_attention: Iterable[str]) -> tuple[str, ...]:
        raise NotImplementedError

    def blocks(self, taps: Iterable[str], with_cross_attention: Iterable[str]) -> tuple[str, ...]:
        raise NotImplementedError

    def aggregate(self, records: dict[str, list[torch.Tensor]], latent_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """records: block -> [(B, HW_l, T) per attention layer, in execution order] -> {tap: (B, T, h, w)}."""
        raise NotImplementedError


class PerBlockMean(AttentionMaps):
    """Vermouth's maps: one per block, the mean over the block's cross-attention layers."""

    name = "per-block mean"

    def taps(self, stages, with_cross_attention) -> tuple[str, ...]:
        if not stages:
            return ()
        have = set(with_cross_attention)
        return tuple(ATTN_PREFIX + b for s in parse_stages(stages) for b in STAGES[s] if b in have)

    def blocks(self, taps, with_cross_attention) -> tuple[str, ...]:
        return tuple(tp[len(ATTN_PREFIX):] for tp in taps)

    def aggregate(self, records, latent_hw) -> dict[str, torch.Tensor]:
        h, w = latent_hw
        out = {}
        for name, maps in records.items():
            if not maps:
                raise VermouthError(f"block {name} recorded no cross-attention")
            avg = torch.stack(maps).mean(0)  # (B, HW, 77): mean over the block's layers
            scale = int(round((h * w / avg.shape[1]) ** 0.5))
            out[ATTN_PREFIX + name] = avg.transpose(1, 2).reshape(avg.shape[0], avg.shape[2], h // scale, w // scale)
        return out


PER_BLOCK = PerBlockMean()


class _Stop(Exception):
    """Raised by the hook of the last block needed: the rest of the U-net is never run."""


class _ProbRecorder:
    """Wraps a cross-attention processor: the output is the wrapped processor's, untouched (so
    features are bit-identical with and without maps), and the probabilities are recomputed from
    the same q and k for the record."""

    def __init__(self, inner, sink: list):
        self.inner = inner
        self.sink = sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, HW, d)
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # (B*heads, 77, d)
        probs = attn.get_attention_scores(q, k, None)  # (B*heads, HW, 77)
        b = hidden_states.shape[0]
        self.sink.append(probs.float().view(b, attn.heads, *probs.shape[1:]).mean(1))  # (B, HW, 77)
        return out


def _tensor(output) -> torch.Tensor:
    """A module's output tensor: blocks return (hidden, residuals), transformers (hidden,) or an output object."""
    if isinstance(output, tuple):
        return output[0]
    return getattr(output, "sample", output)


def run_taps(
    unet,
    latents: torch.Tensor,
    t: int,
    cond: torch.Tensor,
    taps: Iterable[str],
    grad: bool = False,
    attention: AttentionMaps = PER_BLOCK,
) -> dict[str, torch.Tensor]:
    """One conditional U-net pass returning float32 tap outputs; stops after the last needed block.

    grad=True keeps the autograd graph (training the U-net's norm layers, `train seg --tune-norms`).

    latents (B, 4, h, w), cond (B, 77, D); block and layer taps give (B, C, H, W), attention taps
    what `attention` makes of the recorded probabilities ((B, 77, H, W) per block by default).
    """
    taps = tuple(taps)
    module_taps = [tp for tp in taps if not tp.startswith(ATTN_PREFIX)]
    attn_taps = [tp for tp in taps if tp.startswith(ATTN_PREFIX)]
    attn_blocks = attention.blocks(attn_taps, blocks_with_cross_attention(unet)) if attn_taps else ()
    order = unet_blocks(unet.config)
    last = max({block_of(tp) for tp in module_taps} | set(attn_blocks), key=order.index)
    outputs: dict[str, torch.Tensor] = {}
    records: dict[str, list] = {b: [] for b in attn_blocks}
    handles, restore = [], []

    def keep(name):
        def fn(_module, _inputs, output):
            outputs[name] = _tensor(output).float()
        return fn

    def stop(_module, _inputs, _output):
        raise _Stop

    try:
        for name in module_taps:
            handles.append(unet.get_submodule(name).register_forward_hook(keep(name)))
        handles.append(unet.get_submodule(last).register_forward_hook(stop))
        for name in attn_blocks:
            for attn in _cross_attentions(unet.get_submodule(name)):
                restore.append((attn, attn.processor))
                attn.set_processor(_ProbRecorder(attn.processor, records[name]))
        p = next(unet.parameters())
        timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=p.device)
        try:
            with torch.enable_grad() if grad else torch.inference_mode():
                unet(device_layout(latents.to(p.device, p.dtype)), timesteps,
                     encoder_hidden_states=cond.to(p.device, p.dtype))
        except _Stop:
            pass  # the last needed block ran; the rest of the U-net is skipped on purpose
    finally:
        for h in handles:
            h.remove()
        for attn, proc in restore:
            attn.set_processor(proc)

    if attn_taps:
        outputs.update(attention.aggregate(records, tuple(latents.shape[-2:])))
    return {tp: outputs[tp] for tp in taps}


def unet_output(unet, latents: torch.Tensor, t: int, cond: torch.Tensor) -> torch.Tensor:
    """The full U-net's output, epsilon, v or x0 by the scheduler's prediction_type (DDIM inversion
    converts it: `noise.eps_and_x0`)."""
    p = next(unet.parameters())
    timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=p.device)
    with torch.inference_mode():
        return unet(device_layout(latents.to(p.device, p.dtype)), timesteps,
                    encoder_hidden_states=cond.to(p.device, p.dtype)).sample


def summarize_taps(names: Iterable[str]) -> str:
    """Short form for tables: whole stages by name, other taps listed, e.g. "mid,up +attn(up)"."""
    names = set(names)
    blocks, attn_stages = [], []
    for stage, members in STAGES.items():
        present = [b for b in members if b in names]
        blocks += [stage] if present and len(present) == len(members) else present
        if any(ATTN_PREFIX + b in names for b in members):
            attn_stages.append(stage)
    known = set(BLOCK_ORDER) | {ATTN_PREFIX + b for b in BLOCK_ORDER}
    rest = sorted(names - known)
    levels = sorted(n.split(".level", 1)[1] for n in rest if n.startswith("attn.level"))  # vpd's per-size maps
    rest = [n for n in rest if not n.startswith("attn.level")]
    def order(n: str) -> tuple:  # execution order; a layer inside a block sits with its block
        block = STAGES[n][0] if n in STAGES else n if n in BLOCK_ORDER else ".".join(n.split(".")[:2])
        return (BLOCK_ORDER.index(block) if block in BLOCK_ORDER else len(BLOCK_ORDER), n)

    parts = [",".join(sorted(blocks + rest, key=order))] if blocks or rest else []
    parts += [f"attn({','.join(attn_stages)})"] if attn_stages else []
    parts += [f"attn(level {','.join(levels)})"] if levels else []
    return " +".join(parts)
