"""VPD's online modes for the dense tasks: features recomputed from the cached latents and text rows
through a trainable text adapter (and optionally the U-net), and the cache-made variant that
freezes the adapted prompt.

    online = online_taps(s, split, opts)           # None for VPD-frozen (everything from the store)
    groups = head_groups + online.parameter_groups(task.unet_lr_scale)
    sha = freeze_prompt(s, split, entries, opts, out, tune)   # --freeze-prompt-after N: the adapted table

VPD-online trains the adapter (gamma init 1e-4) with the head, one U-net forward and backward per
step at t=1 (the cached latent needs no noise); the attention maps are detached, as VPD's
checkpointed ldm blocks give them. `--freeze-prompt-after N` trains the adapter online for N steps,
writes C' = c + gamma MLP(c) of every table row as a new context table (keyed by its sha256),
extracts once with it and trains the head from the cache: the prompt VPD learns, at the price of
one extraction instead of a U-net pass per step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.tables import read_table, write_table
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.extract.run import extract
from vermouth_cache.train.online import OnlineTaps


def online_taps(s, split, opts, *, adapter: bool | None = None) -> OnlineTaps | None:
    """The online feature module a head of settings `s` needs, or None (features from the store)."""
    adapter = s.adapter if adapter is None else adapter
    if not (adapter or s.tune_unet):
        return None
    if opts.sd_model is None:
        raise VermouthError("--adapter, --tune-unet and --freeze-prompt-after recompute U-net features: give "
                            "--sd-model")
    return OnlineTaps(opts.sd_model, split, opts.torch_device, norms=False, adapter=adapter, unet=s.tune_unet,
                      seed=s.seed)


def adapted_table(online: OnlineTaps, features, out: Path) -> Path:
    """Every row of the features' context table through the trained adapter, as a new table in `out`."""
    source = (features.manifest["about"].get("request") or {}).get("context_table")
    if not source:
        raise VermouthError("--freeze-prompt-after adapts a context table: the features were made without one "
                            "(--prompt table or table-class)")
    table = read_table(source)
    with torch.no_grad():
        values = online.adapter(torch.from_numpy(table.values).to(next(online.adapter.parameters()).device))
    about = {**table.about, "adapted_from": table.sha256, "adapter": "c + gamma MLP(c), trained online"}
    out.mkdir(parents=True, exist_ok=True)
    return write_table(out / "adapted_table.safetensors", values.cpu().numpy(), table.rows, about)


def extract_with_table(features_entries, table: Path, opts) -> str:
    """Extract every split whose features are `features_entries` again, conditioned on `table`;
    returns the table's sha256 (what selects the new features)."""
    for feats in features_entries:
        saved = feats.manifest["about"]["request"]
        req = ExtractRequest.from_json(saved, store=str(opts.store), context_table=str(table), progress=opts.progress,
                                       **({"device": opts.device} if opts.device else {}))
        extract(req)
    return read_table(table).sha256


def freeze_prompt(s, train, features_entries, opts, out: Path, tune) -> str:
    """`--freeze-prompt-after N`: `tune(settings, online)` trains a throwaway head with the adapter
    for N steps, every row of the context table goes through the trained adapter into a new table in
    `out`, and every split of `features_entries` is extracted again with it. Returns the new table's
    sha256, the pin that selects those features."""
    tuned = with_steps(s, s.freeze_prompt_after)
    online = online_taps(tuned, train, opts)
    tune(tuned, online)
    return extract_with_table(features_entries, adapted_table(online, train.features, out), opts)


def with_steps(s, steps: int):
    """Settings `s` trained for `steps` iterations (the prompt-tuning phase)."""
    return type(s).parse({**s.to_json(), "iters": steps, "epochs": None, "freeze_prompt_after": None,
                          "adapter": True})


def table_pins(pins: dict, sha: str | None) -> dict:
    """The features pins, narrowed to the features of the table `sha` when there is one."""
    return {**pins, "table": sha} if sha else pins



def mode_label(s) -> str:
    """How the features were made for a head of settings `s`: the label a report shows beside its metric."""
    if s.method != "vpd":
        return s.method
    if s.freeze_prompt_after:
        return f"vpd-frozen-prompt ({s.freeze_prompt_after} steps)"
    return "vpd-online" + ("+unet" if s.tune_unet else "") if (s.adapter or s.tune_unet) else "vpd-frozen"
