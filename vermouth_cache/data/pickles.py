"""Reading the pickles VPD's data ships in, without ever running code from them.

Two kinds reach this tool: REFER's `refs(unc).p` (plain dicts, lists, strings and numbers) and
VPD's `.pth` embedding tables (a torch zip whose `data.pkl` rebuilds tensors). A pickle can import
and call anything, so neither is unpickled the usual way:

- `load_plain_pickle` refuses every GLOBAL opcode: only built-in containers and scalars load.
- `load_torch_tensors` resolves NO global either: the few names a torch tensor file needs
  (`torch._utils._rebuild_tensor_v2`, `torch.FloatStorage`, `collections.OrderedDict`) are read as
  inert markers, the tensor bytes come straight from the zip's `data/<key>` files through numpy,
  and any other global is refused by name.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

from vermouth_cache.core.errors import VermouthError


class _Plain(pickle.Unpickler):
    def find_class(self, module, name):
        raise VermouthError(f"{self.source}: refuses the pickled global {module}.{name} (only plain data loads)")

    def persistent_load(self, pid):
        raise VermouthError(f"{self.source}: refuses a pickled persistent id (only plain data loads)")


def load_plain_pickle(path: str | Path):
    """A pickle of dicts, lists, tuples, strings, bytes and numbers; any global is refused."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise VermouthError(f"cannot read {path}: {exc.strerror or exc}") from None
    up = _Plain(io.BytesIO(raw))
    up.source = str(path)
    try:
        return up.load()
    except VermouthError:
        raise
    except Exception as exc:  # truncated or not a pickle at all
        raise VermouthError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None


# storage class name -> numpy dtype (torch's legacy typed storages, as torch.save writes them)
_STORAGES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": None,
             "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
             "ByteStorage": "u1", "BoolStorage": "?"}
_REBUILD = ("torch._utils", "_rebuild_tensor_v2")
_ORDERED_DICT = ("collections", "OrderedDict")


class _Marker:
    """A global read as a name only; calling it records the call (nothing is imported or run)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):
        return _Call(self, args)


class _Call:
    def __init__(self, marker: _Marker, args: tuple):
        self.marker, self.args = marker, args
        self.state = None

    def __setstate__(self, state):  # BUILD on a rebuilt tensor (its backward hooks): kept inert
        self.state = state


class _Storage:
    def __init__(self, dtype: str | None, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, numel


class _TorchZip(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in (_REBUILD, _ORDERED_DICT) or (module == "torch" and name in _STORAGES):
            return _Marker(module, name)
        raise VermouthError(f"{self.source}: refuses the pickled global {module}.{name} (a tensor file needs only "
                            "torch._utils._rebuild_tensor_v2 and a storage type)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Marker)):
            raise VermouthError(f"{self.source}: unexpected persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid
        if _STORAGES.get(kind.name) is None:
            raise VermouthError(f"{self.source}: tensors of {kind.name} are not supported")
        return _Storage(_STORAGES[kind.name], str(key), int(numel))


def _materialise(obj, zf: zipfile.ZipFile, prefix: str, source: str):
    if isinstance(obj, _Call):
        if (obj.marker.module, obj.marker.name) == _ORDERED_DICT:
            return {}
        if (obj.marker.module, obj.marker.name) != _REBUILD:
            raise VermouthError(f"{source}: unexpected call of {obj.marker.module}.{obj.marker.name}")
        storage, offset, size, stride = obj.args[:4]
        if not isinstance(storage, _Storage):
            raise VermouthError(f"{source}: a tensor without a storage")
        buf = np.frombuffer(zf.read(f"{prefix}data/{storage.key}"), dtype=storage.dtype)
        if buf.size != storage.numel:
            raise VermouthError(f"{source}: storage {storage.key} holds {buf.size} values, not {storage.numel}")
        itemsize = buf.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(buf[offset:], shape=tuple(size),
                                               strides=tuple(s * itemsize for s in stride))
        if size and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= buf.size:
            raise VermouthError(f"{source}: a tensor reaches past its storage {storage.key}")
        return np.array(view)  # a copy: the zip's bytes are not kept
    if isinstance(obj, dict):
        return {k: _materialise(v, zf, prefix, source) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, zf, prefix, source) for v in obj)
    return obj


def load_torch_tensors(path: str | Path):
    """The tensors of a `torch.save` zip file as numpy arrays (a tensor, or a dict/list of them),
    read without resolving a single global."""
    path = Path(path)
    if not path.is_file():
        raise VermouthError(f"{path} does not exist")
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise VermouthError(f"{path}: not a torch zip file ({exc}); legacy non-zip .pth files are not read") from None
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise VermouthError(f"{path}: expected one data.pkl in the zip, found {len(pkl)}")
        prefix = pkl[0][: -len("data.pkl")]
        up = _TorchZip(io.BytesIO(zf.read(pkl[0])))
        up.source = str(path)
        try:
            obj = up.load()
        except VermouthError:
            raise
        except Exception as exc:
            raise VermouthError(f"{path}: unreadable data.pkl ({type(exc).__name__}: {exc})") from None
        return _materialise(obj, zf, prefix, str(path))
