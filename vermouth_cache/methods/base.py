"""The method seam: a method is a declared recipe for turning an image into cached features.

A method says how the latent is made from the VAE posterior (`LatentRule`), which request fields it
fixes (the timestep and noise rule of a method that has one: `fixed`), which conditionings a
request may choose (`conditioning.CONDITIONINGS`: captions, null, class names, words, text), what a
tap may name (`TapRule`: block outputs, or layers inside blocks such as `up_blocks.1.attentions.1`),
how cross-attention maps are aggregated (`models.taps.AttentionMaps`), and which pyramid merge a
head of its features uses (a name `train/pyramid.py` defines). The extractor and the recipes read
these declarations; they never test a method's name.

A new method is one file, `methods/<name>.py`, ending with `METHOD = Method(...)` (the package
registers every such module on import; a test or a plug-in may call `register_method` at run time). Its recipes carry "method": <name>, so its features never share a key with another
method's, while the artifacts it shares (captions, text states, latents of the same rules) are
computed once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.models.taps import PER_BLOCK, AttentionMaps


@dataclass(frozen=True)
class LatentRule:
    """How the cached latent is made from the VAE posterior's mean."""
    recipe: str  # what the latents recipe says, e.g. "latent_dist.mean*scaling_factor"
    scaled: bool  # multiply by the backbone's latent scale (the diffusion model's own latent space)

    def latent(self, mean: torch.Tensor, scale: float) -> torch.Tensor:
        return mean * scale if self.scaled else mean


SCALED = LatentRule("latent_dist.mean*scaling_factor", scaled=True)  # what the U-net was trained on
UNSCALED = LatentRule("latent_dist.mean", scaled=False)  # VPD's encode().mode(), no scale factor


@dataclass(frozen=True)
class TapRule:
    """What a tap may name, and how the features recipe says it."""
    recipe: str
    layers: bool = False  # a layer inside a block (up_blocks.1.attentions.1), not only a block output


BLOCK_OUTPUTS = TapRule("block output")
LAYER_OUTPUTS = TapRule("module output", layers=True)


@dataclass(frozen=True)
class Method:
    """One declared way of making features; see the module docstring."""
    name: str
    summary: str  # one line, shown by `extract --help`
    conditionings: tuple[str, ...]  # the prompt sources a request may choose (conditioning.CONDITIONINGS)
    latent: LatentRule = SCALED
    taps: TapRule = BLOCK_OUTPUTS
    attention: AttentionMaps = PER_BLOCK
    merge: str = "stages"  # the pyramid merge a head of these features uses (train/pyramid.py)
    default_stages: str = "mid,up"  # taps of a request that names neither stages nor taps
    default_taps: str | None = None  # ... by name instead, when set
    fixed: Mapping[str, object] = field(default_factory=dict)  # request fields it sets, e.g. {"t": (1,)}
    defaults: Mapping[str, object] = field(default_factory=dict)  # request fields it defaults, e.g. {"prompt": ..}
    keyed: bool = True  # recipes carry "method": name (False only for Vermouth, whose keys predate methods)

    def recipe_tag(self) -> dict:
        """What the features recipe adds to name the method."""
        return {"method": self.name} if self.keyed else {}

    def check_fixed(self, values: Mapping[str, object]) -> None:
        """Refuse a request that sets a field this method fixes to another value (a single value
        fixes a tuple field to that one value: {"t": 1} is {"t": (1,)})."""
        for k, v in self.fixed.items():
            if isinstance(values[k], tuple) and not isinstance(v, tuple):
                v = (v,)
            if values[k] != v:
                shown = ",".join(map(str, v)) if isinstance(v, tuple) else v
                raise VermouthError(f"method {self.name} fixes --{k.replace('_', '-')} to {shown}; drop the option "
                                    "or choose another method")


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make `method` known by name (`extract --method`); a name is registered once."""
    if METHODS.get(method.name, method) != method:
        raise VermouthError(f"another method is already registered as {method.name!r}")
    METHODS[method.name] = method
    return method


def method_named(name: str) -> Method:
    if name not in METHODS:
        raise VermouthError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
    return METHODS[name]
