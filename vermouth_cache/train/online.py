"""Features computed during training, for `train seg --tune-norms` (the paper tunes the U-net's
norm layers for segmentation, so those features change at every step and cannot be cached), and
for VPD's online modes (`--adapter`: VPD's TextAdapter trains on the cached text rows; `--tune-unet`:
the U-net too, at the task's lr multipliers, with gradient checkpointing).

What CAN still come from the cache does: the VAE latents and the text conditions of the features
entry (they do not depend on the norm layers), and the noise follows the same rule as extraction.
So each step costs one U-net forward and backward up to the last tapped block, instead of one
read; before the first update the online taps equal the cached ones (tested).
"""

from __future__ import annotations

import torch
from torch import nn

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.models.loading import Placement
from vermouth_cache.models.pipeline import StableDiffusion
from vermouth_cache.models.noise import batch_noise, ddpm_noised
from vermouth_cache.store.entries import Store
from vermouth_cache.methods import DEFAULT_METHOD, method_named
from vermouth_cache.models.taps import run_taps
from vermouth_cache.train.inputs import CachedSplit
from vermouth_cache.train.loader import Field

NORM_TYPES = (nn.GroupNorm, nn.LayerNorm)
GAMMA_INIT = 1e-4  # VPD's gamma_init_value


class TextAdapter(nn.Module):
    """VPD's TextAdapter (vpd/models.py): c + gamma * MLP(c), the MLP Linear-GELU-Linear of the text
    width, gamma a per-channel scale initialised to 1e-4; applied to every row / token."""

    def __init__(self, width: int, gamma_init: float = GAMMA_INIT):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.gamma = nn.Parameter(torch.ones(width) * gamma_init)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return c + self.gamma * self.fc(c)


class OnlineTaps(nn.Module):
    """batch {"latent", "cond", "index"} -> {tap: (B, ...)} through a U-net with trainable norms."""

    def __init__(self, sd_model: str, split: CachedSplit, device: torch.device, *, norms: bool = True,
                 adapter: bool = False, unet: bool = False, seed: int = 0):
        super().__init__()
        recipe = split.features.manifest["recipe"]
        noise = recipe["noise"]
        if noise["mode"] not in ("ddpm", "none") or noise.get("draws", 1) != 1:
            raise VermouthError("--tune-norms recomputes features online, for --noise ddpm (one draw) or none; "
                                f"the cached features used {noise}")
        sd = StableDiffusion(sd_model, Placement(device, torch.float32))
        if sd.identity("unet") != recipe["unet"]:
            raise VermouthError(f"--sd-model {sd_model} is not the U-net the cached features were made with")
        if sd.schedule_recipe(noise["mode"]) != recipe["schedule"]:  # the noise schedule changes every feature
            raise VermouthError(f"--sd-model {sd_model}: its scheduler ({sd.schedule_recipe(noise['mode'])}) is not the "
                                f"one the cached features were made with ({recipe['schedule']})")
        self.unet, self.scheduler = sd.unet, sd.scheduler
        self.t, self.mode, self.seed = recipe["t"], noise["mode"], noise.get("seed", 0)
        self.taps = list(split.tap_names)
        # the attention maps are aggregated the way the features' method declared (Vermouth's recipes name none)
        self.attention = method_named(recipe.get("method", DEFAULT_METHOD)).attention
        for p in self.norm_parameters() if norms else ():
            p.requires_grad_(True)
        self.train_norms, self.train_unet = norms, unet
        if unet:
            self.unet.requires_grad_(True)
            self.unet.enable_gradient_checkpointing()  # VPD's ldm checkpoints every transformer block
        self.adapter = None
        if adapter:
            torch.manual_seed(seed)
            width = self.unet.config.cross_attention_dim
            self.adapter = TextAdapter(width if isinstance(width, int) else width[0]).to(device)
        self.ids: list[str] = []

    def parameter_groups(self, unet_scale: dict[str, float]) -> list[dict]:
        """What trains besides the head, with lr scales: the adapter at 1.0; the U-net at the task's
        `unet_scale["default"]` and its norm layers at `unet_scale.get("norm", default)` (VPD seg:
        mmcv's custom keys give norms x1.0, the rest x0.1); norms alone (--tune-norms) at 1.0."""
        groups = [{"params": list(self.adapter.parameters()), "lr_scale": 1.0}] if self.adapter else []
        norms = self.norm_parameters() if (self.train_norms or self.train_unet) else []
        if self.train_unet:
            ids = {id(p) for p in norms}
            rest = [p for p in self.unet.parameters() if id(p) not in ids]
            groups.append({"params": rest, "lr_scale": unet_scale["default"]})
            groups.append({"params": norms, "lr_scale": unet_scale.get("norm", unet_scale["default"])})
        elif norms:
            groups.append({"params": norms, "lr_scale": 1.0})
        return groups

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What a run keeps beside its head: the tuned norms and the adapter (a tuned U-net's other
        weights are not written: they are the size of the model)."""
        out = self.norm_state() if (self.train_norms or self.train_unet) else {}
        if self.adapter is not None:
            out.update({f"adapter.{k}": v.detach() for k, v in self.adapter.state_dict().items()})
        return out

    def adapted(self, cond: torch.Tensor) -> torch.Tensor:
        return self.adapter(cond) if self.adapter is not None else cond

    def norm_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.unet.modules() if isinstance(m, NORM_TYPES) for p in m.parameters()]

    def norm_state(self) -> dict[str, torch.Tensor]:
        names = {id(p): n for n, p in self.unet.named_parameters()}
        return {f"unet.{names[id(p)]}": p.detach() for p in self.norm_parameters()}

    def bind(self, store: Store, split: CachedSplit) -> dict:
        """Point the module at `split` (its sample ids) and return the loader fields it reads."""
        recipe = split.features.manifest["recipe"]
        self.ids = store.dataset(split.features.manifest["about"]["dataset_record"])["ids"]
        return {"latent": Field(store.find("latents", recipe["latents"]), "latent"),
                "cond": Field(store.find("text", recipe["text"]), "cond")}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        z0 = batch["latent"]
        if self.mode == "ddpm":
            ids = [self.ids[int(i)] for i in batch["index"]]
            eps = batch_noise(self.seed, ids, self.t, 0, z0.shape[1:]).to(z0.device)
            z0 = ddpm_noised(self.scheduler, z0, eps, self.t)
        return run_taps(self.unet, z0, self.t, self.adapted(batch["cond"]), self.taps, grad=torch.is_grad_enabled(),
                        attention=self.attention)
