"""Datasets: which images exist, what they are called, and what labels they carry.

`load_dataset` accepts an image-folder tree ``root/<class>/<image>``, a CoOp split file
``split_zhou_<Name>.json`` (``{"train": [[rel_path, label, classname], ...], ...}``), or a CSV /
JSONL manifest (``path`` plus optional ``label``, ``classname``, ``split``, ``domain``, ``mask``).
Segmentation roots (ADE20K, COCO-Stuff, VOC, Pascal Context, generic images/ + masks/) are
loaded by `vermouth_cache.data.seg` when a layout is named or recognised.

A sample's id is its relative POSIX path under the image root, and samples are always sorted by
id, so the dataset identity (a hash of the sorted ``(id, sha256 of bytes)`` pairs) and any
sharding built on the order do not depend on directory listing order, mtimes or where the
dataset happens to live on disk. Only existence is checked here; decoding happens later
(`vermouth_cache.data.images`) so one bad image is recorded per sample instead of failing the load.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import posixpath
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.hashing import canonical_json, file_sha256

# Integer labels that come without class names (a manifest's bare label column) index a class
# list made up of their numbers: it is capped so a typo like 10**11 cannot build it.
MAX_UNNAMED_LABELS = 100_000
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
_COOP_NAME = re.compile(r"^split_zhou_(?P<name>.+)\.json$")


@dataclass(frozen=True)
class Sample:
    id: str  # relative POSIX path under the root, e.g. "dog/001.jpg"
    path: Path  # absolute path
    label: int | None
    classname: str | None
    split: str | None = None
    domain: str | None = None
    mask: Path | None = None  # absolute path of a label map, when the manifest has one


@dataclass(frozen=True)
class Dataset:
    name: str
    root: Path
    samples: tuple[Sample, ...]
    classnames: tuple[str, ...]  # index = label
    source: dict  # {"kind", "spec", "split", "shots", "shot_seed"}: how it was loaded
    # Memo of identity(); excluded from eq/repr so two loads of the same data compare equal.
    _identity: str | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.samples)

    def identity(self) -> str:
        """sha256 hex of canonical_json(sorted [[id, sha256 of bytes], ...]); computed once.

        Labels, classnames and paths are deliberately not part of it: the identity says which
        image bytes are in the set, which is what cached features depend on.
        """
        if self._identity is None:
            samples = self.samples
            # Hash one file here first so the process-wide memo is created once, not raced by
            # the pool threads; the rest is I/O bound, so threads overlap reads well.
            hashes = [_hash(samples[0])] if samples else []
            workers = min(32, 2 * (os.cpu_count() or 4))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                hashes += list(pool.map(_hash, samples[1:]))
            pairs = sorted([s.id, h] for s, h in zip(samples, hashes))
            digest = hashlib.sha256(canonical_json(pairs).encode()).hexdigest()
            object.__setattr__(self, "_identity", digest)  # frozen: bypass only for the memo
        return self._identity

    def describe(self) -> dict:
        """Readable summary for store manifests."""
        return {"name": self.name, "n_samples": len(self.samples), "identity": self.identity(),
                "source": dict(self.source), "classnames": list(self.classnames)}


def _hash(sample: Sample) -> str:
    try:
        return file_sha256(sample.path)
    except OSError as e:  # deleted or unreadable since the load
        raise VermouthError(f"cannot read image {sample.path}: {e.strerror or e}") from None


def load_dataset(spec: str | Path, *, image_root: str | Path | None = None,
                 split: str | None = None, shots: int | None = None,
                 shot_seed: int = 0, layout: str | None = None) -> Dataset:
    """Load a folder tree, CoOp split file or CSV/JSONL manifest; see the module docstring.

    With `layout`, or a directory that `seg_data.detect_layout` recognises, the spec is a
    segmentation dataset root: see `seg_data.load_seg_dataset`. A recognised root whose layout
    has fixed splits (all but "generic") needs `split`; without one it is refused rather than
    read as an image folder whose "classes" would be its image and mask directories.
    """
    spec = _abspath(spec)
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise VermouthError(f"shots must be an integer >= 1, got {shots!r}")
    if not _exists(spec, "dataset"):
        raise VermouthError(f"dataset not found: {spec}")
    if layout is None and spec.is_dir():
        from vermouth_cache.data.seg import LAYOUTS, detect_layout  # lazy: seg_data imports this module

        layout = detect_layout(spec)
        if layout is not None and split is None and LAYOUTS[layout].splits:
            raise VermouthError(f"{spec} is a {layout} segmentation root: give a split "
                                f"({', '.join(LAYOUTS[layout].splits)})")
    if layout is not None:
        if image_root is not None:
            raise VermouthError(f"{spec}: image_root given, but a {layout} layout fixes it")
        if shots is not None:
            raise VermouthError(f"{spec}: shots needs class labels; segmentation samples have none")
        from vermouth_cache.data.seg import load_seg_dataset

        return load_seg_dataset(spec, layout, split)
    if spec.is_dir():
        if split is not None:
            raise VermouthError(f"{spec}: split {split!r} given, but image folders have no splits")
        if image_root is not None:
            raise VermouthError(f"{spec}: image_root given, but an image folder is its own root")
        kind, name, root = "folder", spec.name, spec
        samples, classnames = _load_folder(spec)
    else:
        root = _abspath(image_root) if image_root is not None else spec.parent
        suffix = spec.suffix.lower()
        if suffix == ".json":
            m = _COOP_NAME.match(spec.name)
            name = m.group("name") if m else spec.stem
            if image_root is None and (spec.parent / "images").is_dir():
                root = spec.parent / "images"  # the layout CoOp's data preparation produces
            kind, (samples, classnames) = "coop", _load_coop(spec, root, split)
        elif suffix in (".csv", ".jsonl"):
            kind, name = "manifest", spec.stem
            samples, classnames = _load_manifest(spec, root, split)
        else:
            raise VermouthError(f"unknown dataset file type: {spec} "
                                "(expected a directory, .json, .csv or .jsonl)")
    if not samples:
        what = f"split {split!r} of {spec}" if split is not None else str(spec)
        raise VermouthError(f"dataset is empty: {what}")
    if shots is not None:
        samples = _few_shot(samples, classnames, shots, shot_seed, spec)
    # shot_seed is recorded only when it mattered, so it cannot split otherwise equal sources.
    seed = shot_seed if shots is not None else None
    source = {"kind": kind, "spec": str(spec), "split": split, "shots": shots, "shot_seed": seed}
    # the subset is part of the readable name: listings then tell train from test
    name += f"/{split}" if split else ""
    name += f"/{shots}-shot-seed{shot_seed}" if shots else ""
    return Dataset(name, root, tuple(sorted(samples, key=lambda s: s.id)), classnames, source)


def _short(p) -> str:
    """A path for a one-line message: very long ones keep their ends and say how long they are."""
    p = str(p)
    return p if len(p) <= 200 else f"{p[:80]}...{p[-80:]} ({len(p)} characters)"


def _exists(p: Path, what: str) -> bool:
    """Path.exists, but a name the OS refuses (too long, no permission) is one line naming it."""
    try:
        os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(p):
            raise VermouthError(f"{what} {_short(p)} is a broken symbolic link (to {os.readlink(p)})") from None
        return False
    except OSError as e:
        why = e.strerror or str(e)
        if e.errno == errno.ENAMETOOLONG:
            why += f" (a component of {max(len(c.encode()) for c in Path(p).parts)} bytes)"
        raise VermouthError(f"{what} {_short(p)}: cannot access: {why}") from None
    except ValueError as e:  # an embedded NUL byte
        raise VermouthError(f"{what} {_short(p)}: {e}") from None
    return True


def _inside(root_real: str, p: Path, where: str, what: str = "image") -> None:
    """Refuse `p` if it is a broken symbolic link or one (or a linked directory on its way) that
    leads out of the root whose realpath is `root_real`: a dataset reads only its own tree."""
    real = os.path.realpath(p)
    if not os.path.exists(real):
        if os.path.islink(p):
            raise VermouthError(f"{where}: {what} {_short(p)} is a broken symbolic link (to {os.readlink(p)})")
        raise VermouthError(f"{where}: {what} not found: {_short(p)}")
    if real != root_real and os.path.commonpath([root_real, real]) != root_real:
        raise VermouthError(f"{where}: {what} {_short(p)} is a symbolic link leading outside the "
                            f"image root {root_real} (to {_short(real)})")


def _abspath(p: str | Path) -> Path:
    # abspath normalises ".." lexically without resolving symlinks, so a symlinked dataset
    # keeps the paths the user gave.
    return Path(os.path.abspath(os.path.expanduser(os.fspath(p))))


def _load_folder(root: Path) -> tuple[list[Sample], tuple[str, ...]]:
    # Hidden entries (.git, .ipynb_checkpoints, .DS_Store) are tooling litter, not classes.
    # Symbolic links are followed only inside the root: a broken one, or one leading out of the
    # root (evil.png -> /etc/passwd, a class directory linked from elsewhere), is refused here,
    # when listing, rather than silently dropped or read.
    root_real = os.path.realpath(root)
    visible = sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    for p in visible:
        if p.is_symlink():
            _inside(root_real, p, str(root), "class directory" if p.is_dir() else "entry")
    classes = [p.name for p in visible if p.is_dir()]
    if not classes:
        raise VermouthError(f"{root}: no class subdirectories (expected root/<class>/<image>)")
    samples = []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir(), key=lambda p: p.name):
            if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."):
                if f.is_symlink():
                    _inside(root_real, f, str(root))
                if f.is_file():
                    samples.append(Sample(f"{cls}/{f.name}", f, label, cls))
    return samples, tuple(classes)


def _safe_id(raw, where: str) -> str:
    """Normalise a relative path to a POSIX id; refuse absolute paths and escapes from the root."""
    if not isinstance(raw, str) or not raw.strip():
        raise VermouthError(f"{where}: path must be a non-empty string, got {raw!r}")
    if PurePosixPath(raw).is_absolute() or PureWindowsPath(raw).drive or raw.startswith("\\"):
        raise VermouthError(f"{where}: absolute path refused: {_short(raw)}")
    if ".." in PurePosixPath(raw).parts:
        raise VermouthError(f"{where}: path escapes the image root: {_short(raw)}")
    return posixpath.normpath(raw)  # "./a//b.jpg" and "a/b.jpg" are the same sample


def _existing(root: Path, rel: str, where: str, what: str = "image") -> Path:
    """root / rel, refused (one line naming `where`) unless it is a file inside the root."""
    path = root / rel
    try:
        ok = path.is_file()
    except OSError as e:  # e.g. ENAMETOOLONG: a path component longer than the filesystem allows
        why = e.strerror or str(e)
        if e.errno == errno.ENAMETOOLONG:
            why += f" (a component of {max(len(c.encode()) for c in path.parts)} bytes)"
        raise VermouthError(f"{where}: cannot access {what} {_short(rel)}: {why}") from None
    if not ok or os.path.islink(path) or _linked(root, rel):
        _inside(os.path.realpath(root), path, where, what)
    if not ok:
        raise VermouthError(f"{where}: {what} not found: {_short(path)}")
    return path


def _linked(root: Path, rel: str) -> bool:
    """Whether a directory on the way from root to root / rel is a symbolic link."""
    parts = PurePosixPath(rel).parts[:-1]
    return any(os.path.islink(root.joinpath(*parts[:i + 1])) for i in range(len(parts)))


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


def _load_coop(spec: Path, root: Path, split: str | None):
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
                    f"{spec}: {name}[{i}]: expected [path, label >= 0, name], got {_short(repr(entry))}")
            pairs.append((entry[1], entry[2]))
            wheres.append(f"{spec}: {name}[{i}]")
    classnames = _classnames(pairs, str(spec), wheres)  # file-level problems before per-image ones
    placed = []
    for i, (raw, label, cls) in enumerate(data[split]):
        where = f"{spec}: {split}[{i}]"
        rel = _safe_id(raw, where)
        placed.append((where, Sample(rel, _existing(root, rel, where), label, cls, split=split)))
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


def _load_manifest(spec: Path, root: Path, split: str | None):
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
                raise VermouthError(f"{spec}: line {n}: label {_short(v)} is out of range")
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
        rel = _safe_id(r.get("path"), where)
        mask = r.get("mask")
        if mask is not None:
            mask = _existing(root, _safe_id(mask, f"{where} (mask)"), where, "mask")
        label = label_of.get(n)
        cls = None if label is None else classnames[label]
        sample = Sample(rel, _existing(root, rel, where), label, cls, r.get("split"),
                        r.get("domain"), mask)
        placed.append((where, sample))
    if split is not None and not placed:
        found = ", ".join(sorted({r["split"] for _, r in rows if r.get("split")}))
        raise VermouthError(f"dataset is empty: split {split!r} of {spec} (splits: {found})")
    return _check_unique(placed), classnames


def _few_shot(samples: list[Sample], classnames, k: int, seed: int, spec: Path) -> list[Sample]:
    """CoOp-style K-shot subset: K samples per label, one seeded RNG consumed in label order."""
    by_label: dict[int, list[Sample]] = {}
    for s in samples:
        if s.label is None:
            raise VermouthError(f"{spec}: shots needs labels, but sample {s.id!r} has none")
        by_label.setdefault(s.label, []).append(s)
    rng = random.Random(seed)
    chosen = []
    for label in sorted(by_label):
        items = sorted(by_label[label], key=lambda s: s.id)
        if len(items) < k:
            raise VermouthError(f"{spec}: class {classnames[label]!r} (label {label}) has only "
                                f"{len(items)} samples, fewer than shots={k}")
        chosen.extend(rng.sample(items, k))
    return sorted(chosen, key=lambda s: s.id)
