"""Bundled vocabularies: class names, unseen-class splits and prompt templates for the benchmarks.

Everything lives under ``data/`` as plain text so it can be diffed and cited:

* ``classnames/<name>.txt``: one name per line, line i = label i, spelled as the reference code
  base spells it (CoOp's ``datasets/*.py`` and split files for the 11 few-shot sets, CLIP's
  ImageNet names as CoOp's ``classnames.txt`` copies them; the detectron2-style contiguous order
  of SAN / CAT-Seg / Vermouth ``Seg/data/*.json`` for segmentation; sorted folder names for the
  SBIR sets).
* ``sbir_splits/<name>_unseen.txt``: zero-shot SBIR test classes, folder spelling.
* ``templates.json``: CoOp's one hand-written template per dataset, CLIP's 80 ImageNet templates,
  and the templates the Vermouth SBIR / segmentation code uses.

Names are kept verbatim (underscores included); :func:`prompt_text` turns them into words only
when a prompt is built, so labels and folder names still match the datasets on disk.

Sources (GitHub): ImageNet and the 80 templates from openai/CLIP notebooks/
Prompt_Engineering_for_ImageNet.ipynb; the other CoOp lists from KaiyangZhou/CoOp datasets/*.py
(label rules) with names as in azshue/TPT data/cls_to_names.py, Food101 re-sorted the way CoOp's
read_and_split_data sorts; per-dataset templates from CoOp trainers/zsclip.py; segmentation lists
and templates from develop-productivity/Vermouth Seg/data/*.json; SBIR classes and unseen splits
from the SAKE-format split files in buptLinfy/ZSE-SBIR datasets/*/zeroshot*/cname_cid*.txt.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from vermouth_cache.data.bundled import data_dir
from vermouth_cache.core.errors import VermouthError

_UNSEEN = "_unseen"


def _lines(path: Path) -> list[str]:
    # Shared by bundled and user files: a stray blank line or a comment must never become a label.
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from a Windows editor is not part of a name
    except (OSError, UnicodeDecodeError) as e:
        raise VermouthError(f"cannot read name list {path}: {getattr(e, 'strerror', None) or e}") from None
    stripped = (line.strip() for line in text.splitlines())
    return [line for line in stripped if line and not line.startswith("#")]


def read_name_list(path: str | Path) -> tuple[str, ...]:
    """A user's one-name-per-line file; a duplicate would silently give two labels one text."""
    path = Path(path)
    names = _lines(path)
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise VermouthError(f"{path}: duplicate name {name!r}")
        seen.add(name)
    if not names:
        raise VermouthError(f"{path}: no names (blank lines and # comments are skipped)")
    return tuple(names)


def _index(folder: Path, infix: str) -> dict[str, tuple[str, Path]]:
    # lower-case name -> (name as spelled, file). Listed rather than hard-coded, so a list added to
    # data/ needs no code change; keyed by lower case so "imagenet" finds "ImageNet".
    found = {}
    for p in sorted(folder.glob("*.txt")):
        if infix not in p.stem:
            continue
        shown = p.stem.replace(infix, "", 1) if infix else p.stem
        found[shown.lower()] = (shown, p)
    return found


def _lookup(kind: str, folder: Path, infix: str, name: str) -> Path:
    index = _index(folder, infix)
    hit = index.get(str(name).lower())
    if hit is None:
        known = ", ".join(sorted(shown for shown, _ in index.values()))
        raise VermouthError(f"unknown {kind} {name!r}; known: {known}")
    return hit[1]


@lru_cache(maxsize=None)
def _bundled(path: Path) -> tuple[str, ...]:
    # Bundled lists are not run through read_name_list: CLIP's ImageNet names (which CoOp copies)
    # repeat "missile" and "sunglasses" for two different synsets, and the label order must stay.
    return tuple(_lines(path))


def known_classnames() -> list[str]:
    """Names accepted by :func:`classnames`, as the files spell them."""
    return sorted(shown for shown, _ in _index(data_dir() / "classnames", "").values())


def classnames(name: str) -> tuple[str, ...]:
    """Class names in label order (index i = label i) for a bundled dataset."""
    return _bundled(_lookup("class list", data_dir() / "classnames", "", name))


def unseen_classes(name: str) -> tuple[str, ...]:
    """Zero-shot SBIR unseen classes: "sketchy" (25), "sketchy21", "tuberlin", "quickdraw"."""
    return _bundled(_lookup("unseen split", data_dir() / "sbir_splits", _UNSEEN, name))


@lru_cache(maxsize=1)
def _templates() -> dict[str, tuple[str, ...]]:
    try:
        raw = json.loads((data_dir() / "templates.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VermouthError(f"cannot read {data_dir() / 'templates.json'}: {e}") from None
    return {key.lower(): tuple(value) for key, value in raw.items()}


def template_sets() -> list[str]:
    """The names `templates` knows (lower case)."""
    return sorted(_templates())


def templates(name: str | None = None) -> tuple[str, ...]:
    """Prompt templates for a dataset; anything without its own entry gets the plain CLIP prompt."""
    table = _templates()
    return table.get(str(name).lower(), table["default"]) if name else table["default"]


def prompt_text(template: str, classname: str) -> str:
    """Fill a template with a class name as words: "hot-air_balloon" -> "hot-air balloon"."""
    if "{}" not in template:
        raise VermouthError(f"template {template!r} has no {{}} for the class name")
    # Hyphens stay (they are part of words like "hot-air"); only underscores join words in folders.
    words = " ".join(classname.replace("_", " ").split())
    return template.replace("{}", words)
