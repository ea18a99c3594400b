"""`gc`: remove store entries, named or unused for N days, after showing what will go.

    vermouth-cache gc STORE --unused-days 30          # lists them with sizes, then asks
    vermouth-cache gc STORE --entry features/3f2a --yes

An entry's last use is the latest of its creation and of `used.json`, which extraction, training
and export update (at most once an hour; a read-only open never writes it). Removal deletes the
manifest first, so no reader ever finds a half-removed entry, then the rest. Removing an upstream
entry (text, latents) leaves the features made from it readable; extracting a new t from it
later recomputes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .errors import VermouthError
from .store import Entry, Store


@dataclass
class Doomed:
    entry: Entry
    last_used: float
    bytes: int

    def line(self) -> str:
        from .listing import human_bytes

        age = (time.time() - self.last_used) / 86400 if self.last_used else float("inf")
        about = self.entry.manifest.get("about", {})
        what = about.get("dataset", "")
        if self.entry.kind == "features":
            what += f" t={about.get('t')}"
        return f"{self.entry.prefix:<36} {what:<40} {human_bytes(self.bytes):>10}  unused {age:.1f} days"


def select(store: Store, *, unused_days: float | None = None, names: tuple[str, ...] = ()) -> list[Doomed]:
    """The entries to remove: those named (kind/key or kind/key-prefix) and those unused for `unused_days`."""
    if unused_days is None and not names:
        raise VermouthError("say what to remove: --unused-days N and/or --entry KIND/KEY")
    chosen: dict[str, Entry] = {}
    for name in names:
        kind, _, key = name.partition("/")
        if not key:
            raise VermouthError(f"--entry takes KIND/KEY (e.g. features/3f2a), got {name!r}")
        e = store.find(kind, key)
        chosen[e.prefix] = e
    if unused_days is not None:
        cutoff = time.time() - unused_days * 86400
        for e in store.entries():
            if e.last_used() < cutoff:
                chosen.setdefault(e.prefix, e)
    return [Doomed(e, e.last_used(), e.size_bytes()) for e in sorted(chosen.values(), key=lambda e: e.prefix)]


def remove(store: Store, doomed: list[Doomed]) -> int:
    """Delete the entries; returns the bytes freed."""
    for d in doomed:
        store.remove(d.entry)
    return sum(d.bytes for d in doomed)
