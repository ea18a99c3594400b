"""`export`: one feature entry to a self-contained HDF5 file a collaborator reads with h5py alone.

    vermouth-cache export STORE --out feats.h5 [--entry KEY] [--taps mid_block,up_blocks.0]

Layout: /sample_ids, /labels, /captions, /features/<tap> (N, C, H, W); the recipe and readable
facts as attributes. Only samples computed in every exported tap are written; failed samples are
listed in the `excluded` attribute. Written to a temporary name and renamed into place, so a
killed export never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from vermouth_cache.core.atomic import commit, temp_beside
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.store.entries import Store, refuse_inside_store
from vermouth_cache.store.entry import Entry
from vermouth_cache.store.gc import mark_used
from vermouth_cache.store.records import OK


def select_features_entry(store: Store, key: str | None) -> Entry:
    if key is not None:
        return store.find("features", key)  # an empty key is refused there, never read as "not given"
    entries = store.entries("features")
    if len(entries) == 1:
        return entries[0]
    if not entries:
        raise VermouthError(f"store {store.root} holds no feature entries")
    keys = ", ".join(f"{e.key} ({e.manifest['about'].get('dataset')}, t={e.manifest['about'].get('t')})" for e in entries)
    raise VermouthError(f"store {store.root} holds {len(entries)} feature entries; choose one with --entry: {keys}")


def _output_path(out) -> Path:
    """--out, refused up front (before any reading) if the file cannot be created there."""
    out = Path(out)
    if out.is_dir():
        raise VermouthError(f"cannot write {out}: it is a directory")
    parent = out.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise VermouthError(f"cannot write {out}: the directory {parent} {what}")
    return out


def _create_h5(tmp: Path, out: Path):
    try:
        return h5py.File(tmp, "w")
    except OSError as e:  # h5py wraps errno: "Unable to create file (... errno = 13 ...)"
        raise VermouthError(f"cannot write {out}: {_reason(e)}") from None


def _reason(e: OSError) -> str:
    if e.errno is not None and e.strerror:
        return e.strerror
    return " ".join(str(e).split())  # h5py's messages span several lines


def _remove(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass  # e.g. the directory vanished: nothing of ours is left under the final name anyway


def export_h5(store: Store, out: str | os.PathLike, *, entry: Entry | None = None, entry_key: str | None = None,
              taps: list[str] | None = None) -> dict:
    """Export `entry`, or the features entry `entry_key` names (a key prefix is enough), or the
    store's only features entry. An entry found from a dataset and recipe fields is
    `vermouth_cache.extract.selection.find_features`'s to find."""
    out = _output_path(out)  # an impossible --out is refused before anything is read
    refuse_inside_store(out, "export file")
    if entry is None:
        entry = select_features_entry(store, entry_key)
    mark_used(store, entry)  # and the captions it exports, the text and latents it was made from
    names = entry.array_names()
    taps = taps or names
    unknown = [t for t in taps if t not in names]
    if unknown:
        raise VermouthError(f"entry {entry.key} has no tap {unknown[0]!r} (it has {', '.join(names)})")
    about = entry.manifest["about"]
    record = store.dataset(about["dataset_record"])
    statuses = [entry.statuses(t) for t in taps]
    missing = [i for i in range(entry.n_samples) if any(st[i] is None for st in statuses)]
    if missing:
        raise VermouthError(
            f"entry {entry.key} is incomplete: {len(missing)} of {entry.n_samples} samples not computed "
            f"(first: {record['ids'][missing[0]]}); run extract again to finish it"
        )
    keep = [i for i in range(entry.n_samples) if all(st[i] == OK for st in statuses)]
    excluded = [record["ids"][i] for i in range(entry.n_samples) if i not in set(keep)]
    captions = dict(zip(keep, store.find("captions", about["captions"]).values("captions", keep)))
    out = Path(out)
    tmp = temp_beside(out)  # mode 0666 less the umask, like the file open() would make
    try:
        with _create_h5(tmp, out) as f:
            f.create_dataset("sample_ids", data=np.array([record["ids"][i] for i in keep], dtype=h5py.string_dtype()))
            f.create_dataset("labels", data=np.array([-1 if record["labels"][i] is None else record["labels"][i]
                                                      for i in keep], dtype=np.int64))
            f.create_dataset("captions", data=np.array([captions[i] for i in keep], dtype=h5py.string_dtype()))
            grp = f.create_group("features")
            for tap in taps:
                grp.create_dataset(tap, data=entry.read(tap, keep))
            f.attrs["recipe"] = json.dumps(entry.manifest["recipe"], sort_keys=True)
            f.attrs["key"] = entry.key
            f.attrs["about"] = json.dumps(about, sort_keys=True)
            f.attrs["classnames"] = json.dumps(record["classnames"])
            f.attrs["excluded"] = json.dumps(excluded)
            for k, v in about.items():
                if isinstance(v, (int, float, str)):
                    f.attrs[f"about.{k}"] = v
        commit(tmp, out)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError):  # ENOSPC, EIO, EACCES while writing or renaming: the output's fault
            raise VermouthError(f"cannot write {out}: {_reason(exc)} (nothing written)") from None
        raise
    return {"entry": entry.key, "samples": len(keep), "excluded": len(excluded), "taps": taps, "path": str(out)}
