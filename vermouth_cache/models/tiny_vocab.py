"""What every tiny model shares: the caption word list, CLIP's BPE vocabulary built from it, the
seed offsets, and how JSON files are written (sorted keys, so equal content is equal bytes).

The tokenizers' vocabularies are built from data/words.txt so that common caption words are single
tokens and texts round-trip.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from pathlib import Path

from vermouth_cache.data.bundled import bundled_file

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"

# Seed offsets k in torch.manual_seed(seed + k); fixed so adding a model never reseeds the others.
SEED_OFFSETS = {
    "unet": 0,
    "vae": 1,
    "text_encoder": 2,
    "blip": 3,
    "resnet18": 4,
    "dino": 5,
    "dinov2": 6,
    "clip": 7,
    "sd2_unet": 8,
    "sd2_vae": 9,
    "sd2_text_encoder": 10,
}


def load_words(words_file: str | Path | None = None) -> list[str]:
    """The caption word list, de-duplicated in file order (order fixes token ids)."""
    path = Path(words_file) if words_file is not None else bundled_file("words.txt")
    seen: dict[str, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        w = line.strip().lower()
        if w and w.isalpha() and w.isascii():
            seen.setdefault(w, None)
    if not seen:
        raise ValueError(f"no words in {path}")
    return list(seen)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (same as transformers' CLIP tokenization)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_clip_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train CLIP-style BPE merges on `words` until each word is one token; return (vocab, merges).

    Real BPE training (most frequent pair first) rather than one merge chain per word: encoding
    applies merges by rank, and only merges learnt this way are guaranteed to re-assemble every
    training word. Ties break on the pair itself, so the result is deterministic.
    """
    segs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    counts: Counter[tuple[str, str]] = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, s in enumerate(segs):
        for pair in zip(s, s[1:]):
            counts[pair] += 1
            where[pair].add(i)
    # Lazy-deletion heap: stale entries are skipped when their count no longer matches.
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap:
        negc, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -negc or negc == 0:
            continue
        merges.append(pair)
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair)):
            s = segs[i]
            for p in zip(s, s[1:]):
                counts[p] -= 1
                touched.add(p)
            merged, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == pair:
                    merged.append(s[j] + s[j + 1])
                    j += 2
                else:
                    merged.append(s[j])
                    j += 1
            segs[i] = merged
            for p in zip(merged, merged[1:]):
                counts[p] += 1
                where[p].add(i)
                touched.add(p)
        for p in sorted(touched):
            if counts[p] <= 0:
                counts.pop(p, None)
                where.pop(p, None)
            else:
                heapq.heappush(heap, (-counts[p], p))

    # Same id layout as OpenAI's CLIP vocab: bytes, bytes + "</w>", merges in rank order, specials.
    b2u = list(bytes_to_unicode().values())
    tokens = b2u + [t + "</w>" for t in b2u] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def dump_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")

