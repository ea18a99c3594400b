"""`verify`: find every damaged shard of a store, naming its samples; nothing is written.

    vermouth-cache verify STORE [--deep]      # names every bad shard and its samples; exit 1 if any

`verify` checks, per entry: the manifest and array metadata parse (and hold no pickled types);
every shard record parses and matches the entry's shard bounds; every committed chunk exists
and has exactly the size its record and its array's shape say (a truncated chunk fails here).
`--deep` also reads every chunk and checks its CRC32C against the chunk's own trailer and the
record (a flipped byte, or a chunk swapped for another). Shards without a record are reported as
incomplete (an extraction still running or interrupted), not as damage; samples whose image
failed are listed as recorded failures.

Recomputing what `verify` finds is extraction: `vermouth_cache.extract.repair`. `remove_dead_claims`
and `remove_debris` clear what killed writers left, which no reader ever opens.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.progress import track
from vermouth_cache.store.claims import Claims
from vermouth_cache.store.entries import KINDS, Store
from vermouth_cache.store.entry import Entry
from vermouth_cache.store.records import OK, ShardDamage

DEBRIS_AGE = 3600.0  # seconds: temporary files older than this belong to no live writer


@dataclass
class Problem:
    entry: str  # "kind/key"
    array: str | None
    shard: int | None
    what: str
    samples: list[str] = field(default_factory=list)  # ids of the shard's samples

    def line(self) -> str:
        where = self.entry + (f" {self.array}" if self.array else "") + (f" shard {self.shard}" if self.shard is not None else "")
        who = ""
        if self.samples:
            who = f" (samples {', '.join(self.samples[:4])}{', ...' if len(self.samples) > 4 else ''})"
        return f"{where}: {self.what}{who}"


@dataclass
class Verification:
    store: str
    deep: bool
    entries: int = 0
    records: int = 0
    bytes_read: int = 0
    problems: list[Problem] = field(default_factory=list)
    incomplete: dict[str, dict[str, int]] = field(default_factory=dict)  # entry -> array -> shards missing
    failed_samples: dict[str, list[str]] = field(default_factory=dict)  # entry -> ids recorded as failed
    leftover_claims: int = 0  # claim files of dead writers
    debris: int = 0  # temporary files of killed writers

    @property
    def ok(self) -> bool:
        return not self.problems

    def bad_shards(self) -> dict[str, dict[str, set[int]]]:
        out: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
        for p in self.problems:
            if p.array is not None and p.shard is not None:
                out[p.entry][p.array].add(p.shard)
        return {e: dict(a) for e, a in out.items()}

    def summary(self) -> str:
        lines = [f"store {self.store}: {self.entries} entries, {self.records} shard records"
                 + (f", {self.bytes_read / 1e6:.1f} MB read and checksummed" if self.deep else "")]
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  {p.line()}" for p in self.problems]
        else:
            lines.append("no damage found" + ("" if self.deep else " (sizes only; --deep also checks every byte)"))
        for entry, arrays in self.incomplete.items():
            lines.append(f"incomplete: {entry}: " + ", ".join(f"{a} {n} shard(s) not computed" for a, n in arrays.items()))
        for entry, ids in self.failed_samples.items():
            lines.append(f"recorded failures: {entry}: {len(ids)} sample(s), e.g. {', '.join(ids[:3])}")
        if self.leftover_claims or self.debris:
            lines.append(f"left by dead writers: {self.leftover_claims} claim file(s), {self.debris} temporary "
                         "file(s) (never read; `repair` removes them)")
        return "\n".join(lines)


def _ids(store: Store, entry: Entry) -> list[str]:
    about = entry.manifest.get("about", {})
    key = about.get("dataset_record")
    if key:
        try:
            return list(store.dataset(key)["ids"])
        except VermouthError:
            pass
    names = entry.manifest.get("recipe", {}).get("classnames")
    return list(names) if names else [f"#{i}" for i in range(entry.n_samples)]


def verify(store: Store, *, deep: bool = False, progress: bool = True) -> Verification:
    """Check every entry of `store`; nothing is written."""
    v = Verification(str(store.root), deep)
    prefixes = [(k, key) for k in KINDS for key in store.loc.list(k)]
    for kind, key in track(prefixes, "verify", "entry", enabled=progress):
        entry = Entry(store.loc, kind, key)
        if not store.loc.exists(f"{entry.prefix}/manifest.json"):
            v.problems.append(Problem(entry.prefix, None, None, "no manifest (left over from a removal; "
                                      "`vermouth-cache gc` does not list it, delete the folder)"))
            continue
        try:
            entry.manifest
        except VermouthError as exc:
            v.problems.append(Problem(entry.prefix, None, None, f"unreadable manifest: {exc}"))
            continue
        v.entries += 1
        try:
            _verify_entry(store, entry, v)
        except Exception as exc:  # noqa: BLE001 - verify reports damage, it never dies of it
            v.problems.append(Problem(entry.prefix, None, None, f"cannot be checked ({type(exc).__name__}: "
                                                                f"{str(exc)[:200]})"))
    for name in store.loc.list("datasets"):
        key = name[:-5] if name.endswith(".json") else name
        try:
            store.dataset(key)
        except VermouthError as exc:
            v.problems.append(Problem(f"datasets/{name}", None, None, str(exc)))
    return v


def _verify_entry(store: Store, entry: Entry, v: Verification) -> None:
    try:
        specs = entry.arrays
    except VermouthError as exc:
        v.problems.append(Problem(entry.prefix, None, None, str(exc)))
        return
    ds_key = entry.manifest.get("about", {}).get("dataset_record")
    if ds_key is not None:
        try:
            store.dataset(ds_key)
        except VermouthError as exc:  # every reader of the entry would refuse it: damage, not a detail
            v.problems.append(Problem(entry.prefix, None, None, f"its dataset record cannot be read: {exc}"))
    ids = _ids(store, entry)
    names = sorted(set(entry.record_names()) | set(specs) | set(entry.broken))
    failed = set()
    for name, why in entry.broken.items():
        if not entry.done_shards(name):
            v.problems.append(Problem(entry.prefix, name, None, why))
    for name in names:
        done = entry.done_shards(name)
        folder = f"{entry.prefix}/shards/{name}"
        for odd in sorted(set(store.loc.list(folder)) - set(store.loc.list_files(folder))):
            shard = int(odd[:-5]) if odd.endswith(".json") and odd[:-5].isdigit() else None
            if shard is not None and shard < entry.n_shards:
                start, stop = entry.shard_bounds(shard)
                v.problems.append(Problem(entry.prefix, name, shard, "a folder stands where its record should be",
                                          ids[start:stop]))
        missing = entry.n_shards - len(done & set(range(entry.n_shards)))
        if missing:
            v.incomplete.setdefault(entry.prefix, {})[name] = missing
        for shard in sorted(done):
            start, stop = entry.shard_bounds(shard)
            bad = entry.broken.get(name) or _check_shard(store, entry, name, shard, specs, v, failed, ids)
            if bad:
                v.problems.append(Problem(entry.prefix, name, shard, bad, ids[start:stop]))
    judge = Claims(store.loc)
    for name in store.loc.list(f"{entry.prefix}/claims"):
        try:
            alive = judge.alive(store.loc.read_json(f"{entry.prefix}/claims/{name}"))
        except (FileNotFoundError, VermouthError):
            alive = False
        v.leftover_claims += not alive
    v.debris += len(store.loc.debris(entry.prefix))
    if failed:
        v.failed_samples[entry.prefix] = [ids[i] for i in sorted(failed)]


def _check_shard(store, entry: Entry, name: str, shard: int, specs: dict, v: Verification, failed: set,
                 ids: list[str]) -> str | None:
    """What is wrong with one committed shard, or None: the same checks every read makes
    (`Entry.checked_record`, `Entry.checked_chunk`), the chunk's bytes only with --deep."""
    try:
        rec = entry.checked_record(name, shard)
        if rec is None:
            return "record vanished while verifying"
        v.records += 1
        start = entry.shard_bounds(shard)[0]
        failed.update(start + i for i, s in enumerate(rec.status) if s != OK)
        if rec.chunk is None:
            return None
        if name not in specs:  # its metadata is missing or altered: named once per array by _verify_entry
            return None
        data = entry.checked_chunk(name, shard, rec, read=v.deep)
        v.bytes_read += len(data or b"")
    except ShardDamage as exc:
        return exc.reason
    return None


def remove_dead_claims(store: Store) -> int:
    """Delete claim files whose holder is dead; returns how many."""
    claims = Claims(store.loc)
    return sum(claims.remove_dead(entry.prefix) for entry in store.entries())


def remove_debris(store: Store) -> int:
    """Delete the temporary files killed writers left (`DEBRIS_AGE` old: no live writer is still
    filling them); returns how many."""
    removed = 0
    for entry in store.entries():
        for key in store.loc.debris(entry.prefix, older_than=DEBRIS_AGE):
            store.loc.delete(key)
            removed += 1
    return removed
