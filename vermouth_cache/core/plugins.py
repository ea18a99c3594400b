"""Plug-in discovery: every module of a package declares one object (a method, a task).

    for name, declared in discover(__name__, __path__, "METHOD", Method, skip=("base",)):
        register_method(declared)

A plug-in file that cannot be imported (a syntax error, a missing dependency) or declares nothing
of the right type stops the program with ONE line naming the file and the cause, before any
command runs: a traceback from inside the import machinery would name neither.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from vermouth_cache.core.errors import VermouthError


class PluginError(VermouthError):
    """A plug-in module that cannot be registered."""


def _file(package: str, paths: Iterable[str], module: str) -> str:
    for p in paths:
        candidate = Path(p) / f"{module}.py"
        if candidate.exists():
            return str(candidate)
    return f"{package}.{module}"


def discover(package: str, paths: Iterable[str], attr: str, kind: type, *,
             skip: Iterable[str] = ()) -> Iterator[tuple[str, object]]:
    """(module name, its `attr`) for every module of `package` but `skip`, in name order."""
    paths = list(paths)
    for info in sorted(pkgutil.iter_modules(paths), key=lambda m: m.name):
        if info.name in set(skip):
            continue
        where = _file(package, paths, info.name)
        try:
            module = importlib.import_module(f"{package}.{info.name}")
        except VermouthError as exc:
            raise PluginError(f"plug-in {where} cannot be loaded: {exc}") from None
        except Exception as exc:  # noqa: BLE001 (any failure of third-party plug-in code)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise PluginError(f"plug-in {where} cannot be loaded: {type(exc).__name__}: {first}"[:400]) from None
        declared = getattr(module, attr, None)
        if not isinstance(declared, kind):
            raise PluginError(f"plug-in {where} declares no {attr} = {kind.__name__}(...): every module of "
                              f"{package} but {', '.join(skip)} must")
        yield info.name, declared
