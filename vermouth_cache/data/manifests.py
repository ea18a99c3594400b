"""Datasets described by a file: CoOp split files and CSV / JSONL manifests.

    split_zhou_<Name>.json     {"train": [[rel_path, label, classname], ...], "val": ..., "test": ...}
    manifest.csv | .jsonl      path, and optionally label, classname, split, domain, mask, text

Both are read whole and checked before any image is looked at: a label with two class names, a
label out of range, a duplicate id or a path leaving the image root is one line naming the file
and the entry. Class names come from every split (and, in a manifest, labels are assigned over
every row before the split is picked) so a label means the same class in train and test.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.paths import existing_file, safe_id, short_path
from vermouth_cache.data.samples import Sample

# Integer labels that come without class names (a manifest's bare label column) index a class
# list made up of their numbers: it is capped so a typo like 10**11 cannot build it.
MAX_UNNAMED_LABELS = 100_000


def _check_unique(placed: list[tuple[str, Sample]]) -> list[Sample]:
    """Samples from (where, sample) pairs; two rows naming the same file would double-count it."""
    first: dict[str, str] = {}
    for where, s in placed:
        if s.id in first:
            raise VermouthError(f"{where}: duplicate sample id {s.id!r} (first at {first[s.id]})")
        first[s.id] = where
    return [s for _, s in placed]


def _classnames(pairs, where: str, entries=None) -> tuple[str, ...]:
    """classnames[label] from (label, name) pairs; a label with two names is an error.

    Labels are bounded before the list is built: when every label is named, by the number of
    classes the file names (max of distinct labels and distinct names, so labels are 0..C-1);
    otherwise by MAX_UNNAMED_LABELS. `entries[i]` names pair i in the error ("file: train[3]").
    """
    names: dict[int, str] = {}
    for label, name in pairs:
        if name is not None and names.setdefault(label, name) != name:
            raise VermouthError(f"{where}: label {label} has two class names: "
                                f"{names[label]!r} and {name!r}")
    named = all(name is not None for _, name in pairs)
    limit = (max(len(names), len(set(names.values()))) if named else
             max(MAX_UNNAMED_LABELS, len({label for label, _ in pairs})))
    for i, (label, _) in enumerate(pairs):
        if label >= limit:
            entry = entries[i] if entries is not None else where
            rule = (f"the file names {limit} classes, so labels are 0-{limit - 1}" if named else
                    f"labels without class names are below {MAX_UNNAMED_LABELS}")
            raise VermouthError(f"{entry}: label {label} is out of range ({rule})")
    n = max((label for label, _ in pairs), default=-1) + 1
    # Gaps (labels never named or never used) keep their index so label == position holds.
    return tuple(names.get(i, str(i)) for i in range(n))


def load_coop(spec: Path, root: Path, split: str | None) -> tuple[list[Sample], tuple[str, ...]]:
    """The samples of `split` of a CoOp split file, with images under `root`, and the class names."""
    try:
        data = json.loads(spec.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VermouthError(f"{spec}: cannot read split file: {e}") from None
    except RecursionError:
        raise VermouthError(f"{spec}: cannot read split file: JSON nested too deeply") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise VermouthError(f"{spec}: not a CoOp split file ({{split: [[path, label, name]]}})")
    if split is None or split not in data:
        problem = "needs a split" if split is None else f"has no split {split!r}"
        raise VermouthError(f"{spec} {problem}; available: {', '.join(sorted(data))}")
    # Class names come from every split so a label means the same class in train and test.
    pairs, wheres = [], []
    for name, entries in data.items():
        for i, entry in enumerate(entries):
            ok = isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], str)
            if not ok or type(entry[1]) is not int or entry[1] < 0:
                raise VermouthError(
                    f"{spec}: {name}[{i}]: expected [path, label >= 0, name], got {short_path(repr(entry))}")
            pairs.append((entry[1], entry[2]))
            wheres.append(f"{spec}: {name}[{i}]")
    classnames = _classnames(pairs, str(spec), wheres)  # file-level problems before per-image ones
    placed = []
    for i, (raw, label, cls) in enumerate(data[split]):
        where = f"{spec}: {split}[{i}]"
        rel = safe_id(raw, where)
        placed.append((where, Sample(rel, existing_file(root, rel, where), label, cls, split=split)))
    return _check_unique(placed), classnames


def _read_rows(spec: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs with values as str or None; line numbers are the file's own."""
    rows = []
    try:
        with open(spec, encoding="utf-8-sig", newline="") as f:  # -sig: Excel writes a BOM
            if spec.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                rows = [(reader.line_num, row) for row in reader]
            else:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise VermouthError(f"{spec}: line {n}: invalid JSON: {e.msg}") from None
                    except RecursionError:
                        raise VermouthError(f"{spec}: line {n}: invalid JSON: nested too deeply") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise VermouthError(f"{spec}: cannot read manifest: {e}") from None
    out = []
    for n, row in rows:
        if not isinstance(row, dict):
            raise VermouthError(f"{spec}: line {n}: expected a JSON object")
        clean = {}
        for k, v in row.items():
            if k is None:  # csv: more cells than header columns
                raise VermouthError(f"{spec}: line {n}: more cells than header columns")
            if isinstance(v, bool) or not isinstance(v, (str, int, type(None))):
                raise VermouthError(f"{spec}: line {n}: {k} must be a string or integer, got {v!r}")
            v = None if v is None else str(v).strip()
            clean[k.strip()] = v or None  # an empty cell means "not given"
        out.append((n, clean))
    return out


def load_manifest(spec: Path, root: Path, split: str | None) -> tuple[list[Sample], tuple[str, ...]]:
    """The samples of a CSV / JSONL manifest (those of `split`, if given) and the class names."""
    rows = _read_rows(spec)
    columns = set().union(*(r.keys() for _, r in rows))
    if rows and "path" not in columns:
        raise VermouthError(f"{spec}: manifest has no 'path' column")
    if split is not None and "split" not in columns:
        raise VermouthError(f"{spec}: split {split!r} given, but the manifest has no split column")

    # Labels are assigned over ALL rows before split filtering, so train and test agree.
    given = {n: r["label"] for n, r in rows if r.get("label") is not None}
    if given and all(v.isascii() and v.isdigit() for v in given.values()):
        for n, v in given.items():
            if len(v) > 15:  # int() of a 5000-digit string raises; no class list is that long
                raise VermouthError(f"{spec}: line {n}: label {short_path(v)} is out of range")
        label_of = {n: int(v) for n, v in given.items()}
        pairs = [(label_of[n], r.get("classname")) for n, r in rows if n in label_of]
        wheres = [f"{spec}: line {n}" for n, _ in rows if n in label_of]
        classnames = _classnames(pairs, str(spec), wheres)
    else:
        # Labels given as class names (or only a classname column): index = sorted unique names.
        name_of = {}
        for n, r in rows:
            name, cls = r.get("label"), r.get("classname")
            if given and cls is not None and name is not None and cls != name:
                raise VermouthError(f"{spec}: line {n}: label {name!r} != classname {cls!r}")
            name = name if given else cls
            if name is not None:
                name_of[n] = name
        classnames = tuple(sorted(set(name_of.values())))
        index = {c: i for i, c in enumerate(classnames)}
        label_of = {n: index[c] for n, c in name_of.items()}

    placed = []
    for n, r in rows:
        if split is not None and r.get("split") != split:
            continue
        where = f"{spec}: line {n}"
        rel = safe_id(r.get("path"), where)
        mask = r.get("mask")
        if mask is not None:
            mask = existing_file(root, safe_id(mask, f"{where} (mask)"), where, "mask")
        label = label_of.get(n)
        cls = None if label is None else classnames[label]
        sample = Sample(rel, existing_file(root, rel, where), label, cls, r.get("split"),
                        r.get("domain"), mask, r.get("text"))
        placed.append((where, sample))
    if split is not None and not placed:
        found = ", ".join(sorted({r["split"] for _, r in rows if r.get("split")}))
        raise VermouthError(f"dataset is empty: split {split!r} of {spec} (splits: {found})")
    return _check_unique(placed), classnames
