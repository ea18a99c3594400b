"""`ls`: one row per store entry, with how many samples are done and how much disk it takes.

    table(store, "features", summarize_taps=summarize_taps)   # the CLI passes models.taps' summary

The store knows its arrays by name only; how a list of tap names reads short ("mid,up
+attn(up)") is the backbone's to say, so the caller passes it (`summarize_taps`); by default the
names are listed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.store.entries import Store
from vermouth_cache.store.entry import Entry
from vermouth_cache.store.records import OK

TapSummary = Callable[[Iterable[str]], str]

COLUMNS = ("kind", "key", "dataset", "model", "method", "t", "taps", "res", "prompt", "noise", "dtype", "done/total", "size")


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


def entry_row(entry: Entry, summarize_taps: TapSummary = ",".join) -> dict[str, str]:
    about = entry.manifest.get("about", {})
    ok, failed, total = entry_progress(entry)
    taps = [n for n in entry.array_names() if entry.kind in ("features", "expert")]
    return {
        "kind": entry.kind,
        "key": entry.key,
        "dataset": str(about.get("dataset", "")),
        "model": str(about.get("sd_model") or about.get("model") or about.get("captioner") or about.get("clip_model") or ""),
        "method": str(about.get("method", "")),  # features only (made by a method); "" elsewhere
        "t": str(about.get("t", "")),
        "taps": summarize_taps(taps),
        "res": str(about.get("resolution", "")) + _views(entry),
        "prompt": _prompt(entry),
        "noise": _noise(entry),
        "dtype": (str(about.get("dtype", "")) + (f" {entry.manifest['recipe']['codec']}"  # fp16 zstd, fp16 int8
                                                 if entry.manifest.get("recipe", {}).get("codec") else ""))
                 if entry.kind in ("features", "expert") else "",
        "done/total": f"{ok}/{total}" + (f" ({failed} failed)" if failed else ""),
        "size": human_bytes(entry.size_bytes()),
    }


def damaged_row(entry: Entry, exc: Exception) -> dict[str, str]:
    """A row that shows nothing the entry claims, only that it cannot be trusted."""
    return {c: "" for c in COLUMNS} | {"kind": entry.kind, "key": entry.key,
                                        "done/total": f"damaged: {str(exc)[:60]}... (run verify)"}


def _prompt(entry: Entry) -> str:
    """The caption source, with every setting that tells entries apart (`train`/`export` select by them)."""
    about = entry.manifest.get("about", {})
    prompt = str(about.get("prompt", ""))
    req = about.get("request") or {}
    if prompt == "blip" and req:
        if req.get("caption_prefix"):
            prompt += f" prefix={req['caption_prefix']!r}"
        if (req.get("caption_min_tokens"), req.get("caption_max_tokens")) != (5, 20):
            prompt += f" tokens {req.get('caption_min_tokens')}-{req.get('caption_max_tokens')}"
    elif prompt == "random":
        prompt += f" seed {req.get('seed')}"
    elif about.get("table"):  # what `train --context-table` takes (a sha256 prefix)
        prompt += f" {about['table'][:12]}"
    if about.get("text_layer") not in (None, "final") and entry.kind in ("text", "features"):
        prompt += f" ({about['text_layer']} layer)"
    return prompt


def _views(entry: Entry) -> str:
    """' slide' or ' pad' when the entry's samples are views (data/views.py), so `ls` tells a slide-window
    set from a centre-crop one."""
    src = (entry.manifest.get("about", {}).get("request") or {})
    if src.get("slide"):
        return " slide"
    if (src.get("views") or 1) > 1:
        return f" x{src['views']} views"
    return ""


def _noise(entry: Entry) -> str:
    """The noise of a features entry from its recipe: mode, seed and draws, or inversion steps."""
    if entry.kind != "features":
        return ""
    noise = entry.manifest.get("recipe", {}).get("noise", {})
    out = str(noise.get("mode", ""))
    if "seed" in noise:
        out += f" seed {noise['seed']}"
    if noise.get("draws", 1) != 1:
        out += f" x{noise['draws']} draws"
    if "steps" in noise:
        out += f" {noise['steps']} steps"
    return out


def table(store: Store, kind: str | None = None, *, summarize_taps: TapSummary = ",".join) -> str:
    """The `ls` table of the entries of `store` (of `kind`), a damaged one as a row saying so."""
    rows = []
    for e in store.entries(kind):
        try:
            rows.append(entry_row(e, summarize_taps))
        except VermouthError as exc:
            rows.append(damaged_row(e, exc))
    if not rows:
        return f"store {store.root} holds no entries"
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)
