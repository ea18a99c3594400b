"""The noise each sample sees, independent of batch size, order, workers and interruption.

Draw d of sample `sample_id` at timestep t, with seed `seed`, is

    s = int.from_bytes(sha256(f"{seed}:{sample_id}:{t}:{d}".encode()).digest()[:8], "little") % 2**63
    eps = torch.randn(latent_shape, dtype=torch.float32, generator=torch.Generator("cpu").manual_seed(s))

and the noised latent is the DDPM forward process on SD's schedule,
`zt = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps` (diffusers' `DDPMScheduler.add_noise`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

NOISE_MODES = ("ddpm", "ddim-inversion", "none")


def noise_seed(seed: int, sample_id: str, t: int, draw: int) -> int:
    digest = hashlib.sha256(f"{seed}:{sample_id}:{t}:{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def sample_noise(seed: int, sample_id: str, t: int, draw: int, latent_shape: Sequence[int]) -> torch.Tensor:
    """(C, h, w) float32 standard normal noise for one sample, drawn on the CPU."""
    gen = torch.Generator("cpu").manual_seed(noise_seed(seed, sample_id, t, draw))
    return torch.randn(tuple(latent_shape), dtype=torch.float32, generator=gen)


def batch_noise(seed: int, sample_ids: Sequence[str], t: int, draw: int, latent_shape: Sequence[int]) -> torch.Tensor:
    """(B, C, h, w): one independent draw per sample, stacked."""
    return torch.stack([sample_noise(seed, sid, t, draw, latent_shape) for sid in sample_ids])


def ddpm_noised(scheduler, z0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """Forward-noise z0 (B, C, h, w) to timestep t, in float32 whatever the model dtype."""
    timesteps = torch.full((z0.shape[0],), t, dtype=torch.long)
    return scheduler.add_noise(z0.float(), eps.float(), timesteps)


def inversion_timesteps(t: int, steps: int) -> list[int]:
    """0 = s_0 < s_1 < ... < s_K = t, evenly spaced integers; fewer than `steps` when t < steps."""
    k = min(steps, t)
    return sorted({round(i * t / k) for i in range(k + 1)}) if k > 0 else [0]


def eps_and_x0(output: torch.Tensor, z: torch.Tensor, a: float, prediction_type: str):
    """The noise and the clean sample a U-net output `output` at a sample `z` of noise level
    a = alphas_cumprod[s] stands for, by the scheduler's prediction_type (as diffusers' DDIM
    schedulers read it; x0 is never clipped or thresholded):

        epsilon:       eps = o,                                x0 = (z - sqrt(1 - a) eps) / sqrt(a)
        v_prediction:  eps = sqrt(a) o + sqrt(1 - a) z,        x0 = sqrt(a) z - sqrt(1 - a) o
        sample:        eps = (z - sqrt(a) o) / sqrt(1 - a),    x0 = o
    """
    if prediction_type == "epsilon":
        return output, (z - (1 - a) ** 0.5 * output) / a**0.5
    if prediction_type == "v_prediction":
        return a**0.5 * output + (1 - a) ** 0.5 * z, a**0.5 * z - (1 - a) ** 0.5 * output
    if prediction_type == "sample":
        return (z - a**0.5 * output) / (1 - a) ** 0.5, output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")  # refused with a VermouthError before any work


def ddim_invert(
    scheduler,
    z0: torch.Tensor,
    t: int,
    steps: int,
    unet_output: Callable[[torch.Tensor, int], torch.Tensor],
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Deterministic DDIM inversion of z0 to timestep t in `steps` U-net calls.

    With a_s = alphas_cumprod[s], the clean latent taken as the sample at s_0 = 0, and
    `eps_and_x0` reading the U-net's output by `prediction_type`:
        o = unet_output(z_{k-1}, s_{k-1});  eps, x0 = eps_and_x0(o, z_{k-1}, a_{s_{k-1}})
        z_k = sqrt(a_{s_k}) * x0 + sqrt(1 - a_{s_k}) * eps
    (for epsilon prediction: z_k = sqrt(a_{s_k}) (z_{k-1} - sqrt(1 - a_{s_{k-1}}) eps) / sqrt(a_{s_{k-1}})
    + sqrt(1 - a_{s_k}) eps). The arithmetic is float32; `unet_output` may run the U-net in any dtype.
    """
    abar = scheduler.alphas_cumprod.to(torch.float64)
    z = z0.float()
    seq = inversion_timesteps(t, steps)
    for prev, cur in zip(seq[:-1], seq[1:]):
        out = unet_output(z, prev).float()
        a_prev, a_cur = float(abar[prev]), float(abar[cur])
        eps, x0 = eps_and_x0(out, z, a_prev, prediction_type)
        z = a_cur**0.5 * x0 + (1 - a_cur) ** 0.5 * eps
    return z
