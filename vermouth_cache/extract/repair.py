"""`repair`: recompute exactly the shards `verify` finds bad, from the request each entry keeps.

    vermouth-cache repair STORE [--shallow]   # recomputes every bad shard, then verifies again

`repair` deletes each bad shard's record and chunk and recomputes them from the request kept in
the entry's manifest (the same dataset path and models), after checking that those inputs still
give the same entry key: images or weights that changed since are refused, never mixed in.
Only the bad shards are computed (plus upstream shards they read, if those are missing too). An
array whose metadata is missing or altered is made again whole. Then the claim files of dead
writers and the temporary files of killed ones are removed, and the store is verified again.

Finding damage is the store's (`vermouth_cache.store.check.verify`); recomputing it is
extraction, so it lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.extract.classtext import refill_classtext
from vermouth_cache.extract.targets import TARGETS, refill_targets
from vermouth_cache.extract.masks import refill_masks
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.extract.run import extract
from vermouth_cache.store.check import Verification, remove_dead_claims, remove_debris, verify
from vermouth_cache.store.entries import Store
from vermouth_cache.store.entry import Entry

# kinds `extract` recomputes from the request in their manifest (masks and class texts have their own)
EXTRACT_KINDS = ("captions", "text", "latents", "features", "expert")


@dataclass
class RepairReport:
    repaired: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # entry -> array -> shards
    refused: dict[str, str] = field(default_factory=dict)  # entry -> why it could not be repaired
    claims_removed: int = 0
    debris_removed: int = 0
    after: Verification | None = None


def repair(store: Store, *, deep: bool = True, progress: bool = True, device: str | None = None) -> RepairReport:
    """Recompute every bad shard `verify` finds; returns what was done and a verification after."""
    v = verify(store, deep=deep, progress=progress)
    out = RepairReport()
    for p in v.problems:
        if p.array is None:
            out.refused[p.entry] = p.what
    for prefix, arrays in v.bad_shards().items():
        entry = Entry(store.loc, *prefix.split("/"))
        try:
            _repair_entry(store, entry, arrays, progress, device)
            out.repaired[prefix] = {a: sorted(s) for a, s in arrays.items()}
        except VermouthError as exc:
            out.refused[prefix] = str(exc)
    out.claims_removed = remove_dead_claims(store)
    out.debris_removed = remove_debris(store)
    out.after = verify(store, deep=deep, progress=progress)
    return out


def _repair_entry(store: Store, entry: Entry, arrays: dict[str, set[int]], progress: bool, device) -> None:
    kind, about = entry.kind, entry.manifest.get("about", {})
    for name in arrays:
        if name in entry.broken:  # altered or missing metadata: the array is made again from scratch
            for shard in entry.done_shards(name):
                store.loc.delete(entry.record_key(name, shard))
            store.loc.delete_prefix(f"{entry.prefix}/arrays/{name}")
            arrays[name] = set(range(entry.n_shards))
    if kind in EXTRACT_KINDS:
        saved = about.get("request")
        if not saved:
            raise VermouthError("its manifest keeps no request (made by an older vermouth-cache); remove it with "
                                "`vermouth-cache gc --entry` and extract again")
        t = (about["t"],) if kind == "features" else tuple(saved.get("t") or (200,))
        req = ExtractRequest.from_json(saved, store=str(store.root), t=t, progress=progress,
                                       **({"device": device} if device else {}))
        extract(req, only={entry.prefix: arrays})
    elif kind == "masks":
        refill_masks(store, entry, arrays, progress=progress)
    elif kind in TARGETS:
        refill_targets(store, entry, arrays, progress=progress)
    elif kind == "classtext":
        refill_classtext(store, entry)
    else:
        raise VermouthError(f"no repair for entries of kind {kind}")
