"""`gc`: remove store entries, named or unused for N days, after showing what will go.

    vermouth-cache gc STORE --unused-days 30          # lists them with sizes, then asks
    vermouth-cache gc STORE --entry features/3f2a --yes

An entry's last use is the latest of its creation and of `used.json`, which extraction, training
and export update (at most once an hour; a read-only open never writes it). A use marks the
entry's whole recipe chain (`mark_used`): training from features/ab12 also uses the latents and
text it was made from and the captions behind the text, since training finds features through
them. gc never removes an entry that a kept entry needs (its recipe names the key): found by
--unused-days, it is kept and listed as such; named with --entry, it is refused. Removal deletes
the manifest first, so no reader ever finds a half-removed entry, then the rest.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.store.entries import KINDS, Store
from vermouth_cache.store.entry import Entry
from vermouth_cache.store.listing import human_bytes

_KEY = re.compile(r"[0-9a-f]{16}")  # a store key (`hashing.recipe_key`); longer hashes are identities


def needs(entry: Entry) -> list[str]:
    """The entries (kind/key) that `entry`'s recipe names: features -> latents, text; text -> captions."""
    try:
        r = entry.manifest.get("recipe", {})
    except VermouthError:
        return []  # a damaged manifest vouches for nothing, not even what it needs
    return [f"{k}/{r[k]}" for k in KINDS if isinstance(r.get(k), str) and _KEY.fullmatch(r[k])]


def mark_used(store: Store, entry: Entry) -> None:
    """Note a use of `entry` and of every entry up its recipe chain (not when read-only)."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        e = todo.pop()
        if e.prefix in seen:
            continue
        seen.add(e.prefix)
        e.touch()
        for prefix in needs(e):
            kind, key = prefix.split("/")
            if store.loc.exists(f"{prefix}/manifest.json"):
                todo.append(Entry(store.loc, kind, key))


@dataclass
class Doomed:
    entry: Entry
    last_used: float
    bytes: int

    def line(self) -> str:
        age = (time.time() - self.last_used) / 86400 if self.last_used else float("inf")
        try:
            about = self.entry.manifest.get("about", {})
            what = about.get("dataset", "")
            if self.entry.kind == "features":
                what += f" t={about.get('t')}"
        except VermouthError:
            what = "(damaged manifest)"
        return f"{self.entry.prefix:<36} {what:<40} {human_bytes(self.bytes):>10}  unused {age:.1f} days"


@dataclass
class Kept:
    """An entry unused for the days asked, kept because an entry that stays needs it."""
    entry: Entry
    needed_by: list[str]

    def line(self) -> str:
        return f"kept: {short(self.entry.prefix)} needed by {', '.join(map(short, self.needed_by))}"


def short(prefix: str) -> str:
    """kind/key with the key cut to 12 digits, as `ls` and errors show it."""
    kind, _, key = prefix.partition("/")
    return f"{kind}/{key[:12]}"


def select(store: Store, *, unused_days: float | None = None, names: tuple[str, ...] = (),
           kept: list | None = None) -> list[Doomed]:
    """The entries to remove: those named (kind/key or kind/key-prefix) and those unused for
    `unused_days`, less those an entry that stays needs (appended to `kept` as `Kept`). Naming an
    entry that a staying entry needs is refused."""
    if unused_days is None and not names:
        raise VermouthError("say what to remove: --unused-days N and/or --entry KIND/KEY")
    chosen: dict[str, Entry] = {}
    named: set[str] = set()
    for name in names:
        kind, _, key = name.partition("/")
        if not key:
            raise VermouthError(f"--entry takes KIND/KEY (e.g. features/3f2a), got {name!r}")
        e = store.find(kind, key)
        chosen[e.prefix] = e
        named.add(e.prefix)
    if unused_days is not None:
        cutoff = time.time() - unused_days * 86400
        for e in store.entries():
            if e.last_used() < cutoff:
                chosen.setdefault(e.prefix, e)
    needed_by: dict[str, list[str]] = {}  # prefix -> entries (all of the store) whose recipe names it
    for e in store.entries():
        for prefix in needs(e):
            needed_by.setdefault(prefix, []).append(e.prefix)
    changed = True
    while changed:  # an entry kept for another keeps what it needs in turn
        changed = False
        for prefix in sorted(chosen):
            users = [u for u in needed_by.get(prefix, []) if u not in chosen]
            if not users:
                continue
            if prefix in named:
                raise VermouthError(f"{short(prefix)} is needed by {', '.join(map(short, users))}, which "
                                    f"stay{'' if len(users) > 1 else 's'}: name {'them' if len(users) > 1 else 'it'} "
                                    f"too ({' '.join('--entry ' + short(u) for u in users)}) to remove "
                                    f"{'them all' if len(users) > 1 else 'both'}, or keep it")
            if kept is not None:
                kept.append(Kept(chosen[prefix], users))
            del chosen[prefix]
            changed = True
    return [Doomed(e, e.last_used(), e.size_bytes()) for e in sorted(chosen.values(), key=lambda e: e.prefix)]


def remove(store: Store, doomed: list[Doomed]) -> int:
    """Delete the entries; returns the bytes freed."""
    for d in doomed:
        store.remove(d.entry)
    return sum(d.bytes for d in doomed)
