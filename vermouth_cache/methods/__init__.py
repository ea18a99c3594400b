"""Methods: declared recipes of features (how latents, noise, conditioning, taps and attention maps
are made), read by the extractor and the recipes. Vermouth is the one shipped today.

    method = method_named(req.method)   # a Method; see `base` for what one declares

A new method is ONE file, `methods/<name>.py`, ending with `METHOD = Method(...)`: every module of
this package but the seam's own (`base`, `conditioning`) is a method and is registered when the
package is imported, so `extract --method <name>` offers it. A test or a plug-in may also call
`register_method` at run time.
"""

from __future__ import annotations

import importlib
import pkgutil

from vermouth_cache.methods.base import METHODS, Method, method_named, register_method

SEAM_MODULES = ("base", "conditioning")  # the seam itself; every other module here declares a METHOD
DEFAULT_METHOD = "vermouth"


def _register_modules() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name in SEAM_MODULES:
            continue
        declared = getattr(importlib.import_module(f"{__name__}.{module.name}"), "METHOD", None)
        if not isinstance(declared, Method):
            raise ImportError(f"{__name__}.{module.name} declares no METHOD: every module here but "
                              f"{' and '.join(SEAM_MODULES)} is a method")
        register_method(declared)


_register_modules()

__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "method_named", "register_method"]
