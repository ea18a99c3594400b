"""Model calls on lists of samples: captions, latents, U-net taps, expert features.

The extractor's model calls (text conditions are the conditioning's `encode`, through the
backbone's text encoder). Each function takes per-sample inputs and returns per-sample
float32 outputs, splitting work into model calls of `batch` samples.

On the CPU every call takes ONE sample: oneDNN convolutions and small GEMMs round differently for
different batch sizes (measured: up to 3e-5 absolute on SD 1.5 blocks), which would make a stored
byte depend on --batch-size. One at a time costs little on the CPU, which is compute-bound.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from vermouth_cache.data.images import resize_center_crop, to_model_tensor
from vermouth_cache.data.views import view_tensor
from vermouth_cache.methods.base import LatentRule
from vermouth_cache.models.loading import device_layout
from vermouth_cache.models.noise import batch_noise, ddim_invert, ddpm_noised
from vermouth_cache.models.taps import AttentionMaps, run_taps, unet_output


def call_size(device: torch.device, batch_size: int) -> int:
    return 1 if device.type == "cpu" else batch_size


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to `n` for the block (None: unchanged). On the CPU a stored
    byte depends on it (oneDNN and GEMM reductions split work by thread), so extraction fixes it."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _first_device(model) -> torch.device:
    return next(model.parameters()).device


# -- captions ---------------------------------------------------------------------------------
def blip_captions(captioner, images: Sequence[Image.Image], *, prefix: str, min_new: int, max_new: int,
                  batch: int) -> list[str]:
    """Greedy BLIP captions of the original images (BLIP's processor does its own resize)."""
    proc, model = captioner.processor, captioner.model
    device, dtype = _first_device(model), next(model.parameters()).dtype
    out: list[str] = []
    for chunk in in_batches(list(images), batch):
        kwargs = {"images": list(chunk), "return_tensors": "pt"}
        if prefix:
            kwargs["text"] = [prefix] * len(chunk)
        inputs = proc(**kwargs)
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        with torch.inference_mode():
            ids = model.generate(**inputs, do_sample=False, num_beams=1, min_new_tokens=min_new, max_new_tokens=max_new)
        out += [s.strip() for s in proc.batch_decode(ids, skip_special_tokens=True)]
    return out


# -- latents ----------------------------------------------------------------------------------
def pixel_batch(images: Sequence, resolution: int, geometry: str | None = None) -> torch.Tensor:
    """(B, 3, r, r) in [-1, 1] after the shorter-side resize and centre crop, or, for views, the
    view placed by its `geometry` (padded or squashed: data/views.py). An item may already be its
    (3, r, r) pixels (made while decoding: `shards._decode`)."""
    return torch.stack([img if isinstance(img, torch.Tensor) else view_tensor(img, resolution, geometry)
                        if geometry else to_model_tensor(resize_center_crop(img, resolution)) for img in images])


def vae_latents(sd, images: Sequence, *, resolution: int, rule: LatentRule, batch: int,
                geometry: str | None = None) -> torch.Tensor:
    """(N, 4, r/8, r/8) float32 on the VAE's device (the U-net takes them from there): E(x).latent_dist.mean,
    times the backbone's scaling_factor by the method's latent rule."""
    vae, scale = sd.vae, sd.latent_scale
    device, dtype = _first_device(vae), next(vae.parameters()).dtype
    out = []
    for chunk in in_batches(list(images), batch):
        x = device_layout(pixel_batch(chunk, resolution, geometry).to(device, dtype))
        with torch.inference_mode():
            z = rule.latent(vae.encode(x).latent_dist.mean, scale)
        out.append(z.float().contiguous())
    return torch.cat(out)


# -- U-net taps -------------------------------------------------------------------------------
def unet_features(sd, latents, conds, sample_ids: Sequence[str], *, t: int,
                  taps: Sequence[str], noise: str, seed: int, draws: int, inversion_steps: int,
                  attention: AttentionMaps, batch: int) -> dict[str, np.ndarray]:
    """Tap outputs (N, ...) float32 for each sample, averaged over `draws` noise draws; attention
    maps aggregated by the method's rule. `latents` and `conds`: float32 arrays or tensors, moved to
    the U-net's device once (latents the VAE just computed there stay there)."""
    unet, scheduler = sd.unet, sd.scheduler
    device = _first_device(unet)
    latents, conds = torch.as_tensor(latents).to(device), torch.as_tensor(conds).to(device)
    per_tap: dict[str, list[np.ndarray]] = {tp: [] for tp in taps}
    for start in range(0, len(sample_ids), batch):
        z0 = latents[start:start + batch]
        c = conds[start:start + batch]
        ids = sample_ids[start:start + batch]
        acc: dict[str, torch.Tensor] = {}
        for d in range(draws):
            zt = _noised(unet, scheduler, z0, c, ids, t=t, draw=d, noise=noise, seed=seed, steps=inversion_steps)
            outs = run_taps(unet, zt, t, c, taps, attention=attention)
            for tp, v in outs.items():
                acc[tp] = v if tp not in acc else acc[tp] + v
        for tp in taps:
            per_tap[tp].append((acc[tp] / draws if draws > 1 else acc[tp]).cpu().numpy())
    return {tp: np.concatenate(v) for tp, v in per_tap.items()}


def _noised(unet, scheduler, z0, c, ids, *, t, draw, noise, seed, steps) -> torch.Tensor:
    if noise == "none":
        return z0
    if noise == "ddpm":
        eps = batch_noise(seed, ids, t, draw, z0.shape[1:]).to(z0.device)  # drawn on the CPU: the same on any device
        return ddpm_noised(scheduler, z0, eps, t)
    output: Callable = lambda z, s: unet_output(unet, z, s, c).float()  # noqa: E731
    return ddim_invert(scheduler, z0, t, steps, output, scheduler.config.prediction_type)


# -- expert -----------------------------------------------------------------------------------
def expert_features(expert, images: Sequence, *, resolution: int, batch: int,
                    geometry: str | None = None) -> dict[str, np.ndarray]:
    """Four feature maps per image, highest resolution first: `expert.level0`-`expert.level3`.

    ResNet: the outputs of its 4 stages. ViT (DINO, DINOv2): patch tokens of 4 evenly spaced
    layers reshaped to (C, H/p, W/p), the CLS token dropped.
    """
    model = expert.model
    device, dtype = _first_device(model), next(model.parameters()).dtype
    mean = torch.tensor(expert.image_stats[0]).view(1, 3, 1, 1)
    std = torch.tensor(expert.image_stats[1]).view(1, 3, 1, 1)
    levels: list[list[np.ndarray]] = [[] for _ in range(4)]
    for chunk in in_batches(list(images), batch):
        x = (pixel_batch(chunk, resolution, geometry) + 1) / 2  # back to [0, 1] from the SD pixel range
        x = device_layout(((x - mean) / std).to(device, dtype))
        with torch.inference_mode():
            maps = expert_maps(expert.name, model, x)
        for i, m in enumerate(maps):
            levels[i].append(m.float().cpu().numpy())
    return {f"expert.level{i}": np.concatenate(v) for i, v in enumerate(levels)}


def expert_maps(name: str, model, x: torch.Tensor) -> list[torch.Tensor]:
    if name == "resnet18":
        return list(model(pixel_values=x, output_hidden_states=True).hidden_states[1:5])
    kwargs = {"interpolate_pos_encoding": True} if name == "dino" else {}
    hidden = model(pixel_values=x, output_hidden_states=True, **kwargs).hidden_states
    n_layers = len(hidden) - 1
    patch = model.config.patch_size
    gh, gw = x.shape[-2] // patch, x.shape[-1] // patch
    maps = []
    for layer in (n_layers // 4, n_layers // 2, 3 * n_layers // 4, n_layers):
        tokens = hidden[layer][:, -gh * gw:]  # patch tokens follow CLS (and any register tokens)
        maps.append(tokens.transpose(1, 2).reshape(x.shape[0], -1, gh, gw))
    return maps
