"""`ls`: one row per store entry, with how many samples are done and how much disk it takes."""

from __future__ import annotations

from .errors import VermouthError
from .store import OK, Entry, Store
from .unet_taps import summarize_taps

COLUMNS = ("kind", "key", "dataset", "model", "t", "taps", "res", "prompt", "noise", "done/total", "size")


def entry_progress(entry: Entry) -> tuple[int, int, int]:
    """(samples ok in every array, samples failed, total); captions count their one record set."""
    names = entry.array_names() or ["captions"]
    per = [entry.statuses(name) for name in names]
    ok = sum(all(st[i] == OK for st in per) for i in range(entry.n_samples))
    failed = sum(any(st[i] not in (None, OK) for st in per) for i in range(entry.n_samples))
    return ok, failed, entry.n_samples


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def entry_row(entry: Entry) -> dict[str, str]:
    about = entry.manifest.get("about", {})
    ok, failed, total = entry_progress(entry)
    taps = [n for n in entry.array_names() if entry.kind in ("features", "expert")]
    return {
        "kind": entry.kind,
        "key": entry.key,
        "dataset": str(about.get("dataset", "")),
        "model": str(about.get("sd_model") or about.get("model") or about.get("captioner") or about.get("clip_model") or ""),
        "t": str(about.get("t", "")),
        "taps": summarize_taps(taps),
        "res": str(about.get("resolution", "")),
        "prompt": str(about.get("prompt", "")),
        "noise": str(about.get("noise", "")),
        "done/total": f"{ok}/{total}" + (f" ({failed} failed)" if failed else ""),
        "size": human_bytes(entry.size_bytes()),
    }


def damaged_row(entry: Entry, exc: Exception) -> dict[str, str]:
    """A row that shows nothing the entry claims, only that it cannot be trusted."""
    return {c: "" for c in COLUMNS} | {"kind": entry.kind, "key": entry.key,
                                        "done/total": f"damaged: {str(exc)[:60]}... (run verify)"}


def table(store: Store, kind: str | None = None) -> str:
    rows = []
    for e in store.entries(kind):
        try:
            rows.append(entry_row(e))
        except VermouthError as exc:
            rows.append(damaged_row(e, exc))
    if not rows:
        return f"store {store.root} holds no entries"
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)
