"""`export`: one feature entry to a self-contained HDF5 file a collaborator reads with h5py alone.

    vermouth-cache export STORE --out feats.h5 [--entry KEY] [--taps mid_block,up_blocks.0] [--expert]
        [--compression gzip|lzf]

Layout: /sample_ids, /labels, /captions, /features/<tap> (N, C, H, W), and with `--expert`
/expert/<level> (N, C, H, W) of the dataset's expert entry at the same resolution; the recipes and
readable facts as attributes. Only samples computed in every exported array are written; failed
samples are listed in the `excluded` attribute.

Streamed: each array is copied one store shard at a time into an HDF5 dataset chunked by those
rows (optionally compressed), so memory holds one shard of one array whatever the entry's size,
and a bar counts the shards. Written to a temporary name and renamed into place, so a killed
export never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from vermouth_cache.core.atomic import commit, temp_beside
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.progress import track
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


COMPRESSIONS = ("gzip", "lzf")  # h5py's own filters: a collaborator needs no plugin to read them


def expert_of(store: Store, features: Entry, key: str | None = None) -> Entry:
    """The expert entry of the features' dataset at their resolution (`key` chooses among several)."""
    about = features.manifest["about"]
    found = [e for e in store.entries("expert") if e.manifest["about"].get("dataset_record") == about["dataset_record"]
             and e.manifest["recipe"].get("resolution") == about.get("resolution")
             and (key is None or e.key.startswith(key))]
    codec = features.manifest["recipe"].get("codec", "raw")
    same_codec = [e for e in found if e.manifest["recipe"].get("codec", "raw") == codec]
    if len(found) > 1 and same_codec:  # the expert maps stored like the features (what `train --codec` pairs)
        found = same_codec
    if len(found) == 1:
        return found[0]
    if not found:
        raise VermouthError(f"store {store.root} holds no expert features of {about.get('dataset')} at resolution "
                            f"{about.get('resolution')}" + (f" with key {key!r}" if key else "")
                            + ": extract with --expert first")
    raise VermouthError(f"{len(found)} expert entries of {about.get('dataset')} match: "
                        + ", ".join(f"{e.key[:12]} ({e.manifest['recipe'].get('expert')}, "
                                    f"{e.manifest['recipe'].get('dtype')}, {e.manifest['recipe'].get('codec', 'raw')})"
                                    for e in found) + "; choose one with --expert-entry")


def export_h5(store: Store, out: str | os.PathLike, *, entry: Entry | None = None, entry_key: str | None = None,
              taps: list[str] | None = None, expert: Entry | None = None, compression: str | None = None,
              progress: bool = True) -> dict:
    """Export `entry`, or the features entry `entry_key` names (a key prefix is enough), or the
    store's only features entry, with `expert`'s maps if given. An entry found from a dataset and
    recipe fields is `vermouth_cache.extract.selection.find_features`'s to find."""
    out = _output_path(out)  # an impossible --out is refused before anything is read
    refuse_inside_store(out, "export file")
    if compression is not None and compression not in COMPRESSIONS:
        raise VermouthError(f"unknown compression {compression!r} (choose from {', '.join(COMPRESSIONS)})")
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
    arrays = [(entry, "features", t) for t in taps]
    if expert is not None:
        if expert.n_samples != entry.n_samples or expert.manifest["about"].get("dataset_record") != about["dataset_record"]:
            raise VermouthError(f"expert/{expert.key[:12]} is not over the samples of features/{entry.key[:12]}")
        mark_used(store, expert)
        arrays += [(expert, "expert", n) for n in expert.array_names()]
    statuses = [e.statuses(n) for e, _, n in arrays]
    missing = [i for i in range(entry.n_samples) if any(st[i] is None for st in statuses)]
    if missing:
        e, _, n = arrays[next(k for k, st in enumerate(statuses) if st[missing[0]] is None)]
        raise VermouthError(
            f"entry {e.key} is incomplete: {len(missing)} of {entry.n_samples} samples not computed in {n} "
            f"(first: {record['ids'][missing[0]]}); run extract again to finish it"
        )
    keep = [i for i in range(entry.n_samples) if all(st[i] == OK for st in statuses)]
    kept = set(keep)
    excluded = [record["ids"][i] for i in range(entry.n_samples) if i not in kept]
    captions = dict(zip(keep, store.find("captions", about["captions"]).values("captions", keep)))
    tmp = temp_beside(out)  # mode 0666 less the umask, like the file open() would make
    try:
        with _create_h5(tmp, out) as f:
            f.create_dataset("sample_ids", data=np.array([record["ids"][i] for i in keep], dtype=h5py.string_dtype()))
            f.create_dataset("labels", data=np.array([-1 if record["labels"][i] is None else record["labels"][i]
                                                      for i in keep], dtype=np.int64))
            f.create_dataset("captions", data=np.array([captions[i] for i in keep], dtype=h5py.string_dtype()))
            work = [(e, group, n, shard) for e, group, n in arrays for shard in range(e.n_shards)]
            at = {}  # (group, name) -> rows written so far
            for e, group, n, shard in track(work, f"export {out.name}", "chunk", enabled=progress):
                lo, hi = e.shard_bounds(shard)
                rows = [i for i in range(lo, hi) if i in kept]
                if (group, n) not in at:
                    spec = e.array_spec(n)
                    dtype = np.float32 if spec["dtype"] == "bfloat16" else np.dtype(spec["dtype"])
                    chunk = (max(1, min(e.shard_size, len(keep))), *spec["shape"])
                    f.require_group(group).create_dataset(n, shape=(len(keep), *spec["shape"]), dtype=dtype,
                                                          chunks=chunk if keep else None, compression=compression)
                    at[(group, n)] = 0
                if rows:  # one shard of one array in memory at a time
                    pos = at[(group, n)]
                    f[group][n][pos:pos + len(rows)] = e.read(n, rows)
                    at[(group, n)] = pos + len(rows)
            f.attrs["recipe"] = json.dumps(entry.manifest["recipe"], sort_keys=True)
            f.attrs["key"] = entry.key
            f.attrs["about"] = json.dumps(about, sort_keys=True)
            f.attrs["classnames"] = json.dumps(record["classnames"])
            f.attrs["excluded"] = json.dumps(excluded)
            if expert is not None:
                f.attrs["expert_recipe"] = json.dumps(expert.manifest["recipe"], sort_keys=True)
                f.attrs["expert_key"] = expert.key
            for k, v in about.items():
                if isinstance(v, (int, float, str)):
                    f.attrs[f"about.{k}"] = v
        commit(tmp, out)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError):  # ENOSPC, EIO, EACCES while writing or renaming: the output's fault
            raise VermouthError(f"cannot write {out}: {_reason(exc)} (nothing written)") from None
        raise
    return {"entry": entry.key, "samples": len(keep), "excluded": len(excluded), "taps": taps, "path": str(out),
            "expert": expert.key if expert is not None else None}
