"""Which U-net blocks to keep, and one forward pass that keeps them and stops early.

Tap names follow diffusers' `UNet2DConditionModel` module names: `down_blocks.0`-`down_blocks.3`,
`mid_block`, `up_blocks.0`-`up_blocks.3`; a tap is the block's OUTPUT (after its down/up-sampler),
as the official Vermouth code taps it. `attn.<block>` is the block's cross-attention probabilities
softmax(QK^T/sqrt d), averaged over heads and over the block's attention layers: (77, h, w).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vermouth_cache.core.errors import VermouthError

STAGES = {
    "down": ("down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3"),
    "mid": ("mid_block",),
    "up": ("up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3"),
}
BLOCK_ORDER = STAGES["down"] + STAGES["mid"] + STAGES["up"]  # execution order in the forward pass
ATTN_PREFIX = "attn."


def parse_stages(stages: str | Iterable[str]) -> tuple[str, ...]:
    names = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages) if s.strip()]
    if not names:
        raise VermouthError("no stage given (choose from down, mid, up)")
    for name in names:
        if name not in STAGES:
            raise VermouthError(f"unknown stage {name!r} (choose from down, mid, up)")
    return tuple(s for s in STAGES if s in names)  # canonical order


def taps_for(stages: str | Iterable[str] | None, taps: str | Iterable[str] | None) -> tuple[str, ...]:
    """Block taps from a stage list and/or explicit block names, in execution order."""
    chosen: set[str] = set()
    if stages:
        for stage in parse_stages(stages):
            chosen.update(STAGES[stage])
    if taps:
        for tap in [t.strip() for t in (taps.split(",") if isinstance(taps, str) else taps) if t.strip()]:
            if tap not in BLOCK_ORDER:
                raise VermouthError(f"unknown tap {tap!r} (choose from {', '.join(BLOCK_ORDER)})")
            chosen.add(tap)
    if not chosen:
        raise VermouthError("no U-net block selected (give --stages or --taps)")
    return tuple(b for b in BLOCK_ORDER if b in chosen)


def attn_taps_for(unet_blocks_with_attn: Iterable[str], stages: str | Iterable[str] | None) -> tuple[str, ...]:
    """`attn.<block>` taps for the blocks of `stages` that have cross-attention layers."""
    if not stages:
        return ()
    have = set(unet_blocks_with_attn)
    return tuple(ATTN_PREFIX + b for s in parse_stages(stages) for b in STAGES[s] if b in have)


def unet_blocks(config: dict) -> tuple[str, ...]:
    """The tap names a U-net of this config has, in execution order (SD 1.x/2.x: all nine)."""
    return (tuple(f"down_blocks.{i}" for i in range(len(config.get("down_block_types", ()))))
            + (("mid_block",) if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None else ())
            + tuple(f"up_blocks.{i}" for i in range(len(config.get("up_block_types", ())))))


def blocks_with_cross_attention(unet) -> tuple[str, ...]:
    have = set(unet_blocks(unet.config))
    return tuple(b for b in BLOCK_ORDER if b in have and _cross_attentions(unet.get_submodule(b)))


def _cross_attentions(block) -> list:
    from diffusers.models.attention_processor import Attention

    return [m for name, m in block.named_modules() if name.endswith("attn2") and isinstance(m, Attention)]


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


def run_taps(
    unet,
    latents: torch.Tensor,
    t: int,
    cond: torch.Tensor,
    taps: Iterable[str],
    grad: bool = False,
) -> dict[str, torch.Tensor]:
    """One conditional U-net pass returning float32 tap outputs; stops after the last needed block.

    grad=True keeps the autograd graph (training the U-net's norm layers, `train seg --tune-norms`).

    latents (B, 4, h, w), cond (B, 77, D); block taps give (B, C, H, W), attention taps (B, 77, H, W).
    """
    taps = tuple(taps)
    block_taps = [tp for tp in taps if not tp.startswith(ATTN_PREFIX)]
    attn_blocks = [tp[len(ATTN_PREFIX):] for tp in taps if tp.startswith(ATTN_PREFIX)]
    needed = set(block_taps) | set(attn_blocks)
    last = max(needed, key=BLOCK_ORDER.index)
    outputs: dict[str, torch.Tensor] = {}
    sinks: dict[str, list] = {b: [] for b in attn_blocks}
    handles, restore = [], []

    def hook(name):
        def fn(_module, _inputs, output):
            if name in block_taps:
                outputs[name] = (output[0] if isinstance(output, tuple) else output).float()
            if name == last:
                raise _Stop

        return fn

    try:
        for name in needed:
            handles.append(unet.get_submodule(name).register_forward_hook(hook(name)))
        for name in attn_blocks:
            for attn in _cross_attentions(unet.get_submodule(name)):
                restore.append((attn, attn.processor))
                attn.set_processor(_ProbRecorder(attn.processor, sinks[name]))
        p = next(unet.parameters())
        timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=p.device)
        try:
            with torch.enable_grad() if grad else torch.inference_mode():
                unet(latents.to(p.device, p.dtype), timesteps, encoder_hidden_states=cond.to(p.device, p.dtype))
        except _Stop:
            pass  # the last needed block ran; the rest of the U-net is skipped on purpose
    finally:
        for h in handles:
            h.remove()
        for attn, proc in restore:
            attn.set_processor(proc)

    h, w = latents.shape[-2:]
    for name, maps in sinks.items():
        if not maps:
            raise VermouthError(f"block {name} recorded no cross-attention")
        avg = torch.stack(maps).mean(0)  # (B, HW, 77): mean over the block's layers
        scale = int(round((h * w / avg.shape[1]) ** 0.5))
        outputs[ATTN_PREFIX + name] = avg.transpose(1, 2).reshape(avg.shape[0], avg.shape[2], h // scale, w // scale)
    return {tp: outputs[tp] for tp in taps}


def unet_output(unet, latents: torch.Tensor, t: int, cond: torch.Tensor) -> torch.Tensor:
    """The full U-net's output, epsilon, v or x0 by the scheduler's prediction_type (DDIM inversion
    converts it: `noise.eps_and_x0`)."""
    p = next(unet.parameters())
    timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=p.device)
    with torch.inference_mode():
        return unet(latents.to(p.device, p.dtype), timesteps, encoder_hidden_states=cond.to(p.device, p.dtype)).sample


def summarize_taps(names: Iterable[str]) -> str:
    """Short form for tables: whole stages by name, other blocks listed, e.g. "mid,up +attn(up)"."""
    names = set(names)
    blocks, attn_stages = [], []
    for stage, members in STAGES.items():
        present = [b for b in members if b in names]
        blocks += [stage] if present and len(present) == len(members) else present
        if any(ATTN_PREFIX + b in names for b in members):
            attn_stages.append(stage)
    known = set(BLOCK_ORDER) | {ATTN_PREFIX + b for b in BLOCK_ORDER}
    rest = sorted(names - known)
    parts = [",".join(blocks)] if blocks else []
    parts += [f"attn({','.join(attn_stages)})"] if attn_stages else []
    parts += [",".join(rest)] if rest else []
    return " +".join(parts)
