"""Methods: declared recipes of features (how latents, noise, conditioning, taps and attention maps
are made), read by the extractor and the recipes. Vermouth is the one shipped today.

    method = method_named(req.method)   # a Method; see `base` for what one declares

A new method is ONE file, `methods/<name>.py`, ending with `METHOD = Method(...)`: every module of
this package but the seam's own (`base`, `conditioning`) is a method and is registered when the
package is imported, so `extract --method <name>` offers it. A test or a plug-in may also call
`register_method` at run time.
"""

from __future__ import annotations

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.plugins import PluginError, discover
from vermouth_cache.methods.base import METHODS, Method, method_named, register_method

SEAM_MODULES = ("base", "conditioning")  # the seam itself; every other module here declares a METHOD
DEFAULT_METHOD = "vermouth"


def _register_modules() -> None:
    for name, declared in discover(__name__, __path__, "METHOD", Method, skip=SEAM_MODULES):
        try:
            register_method(declared)
        except VermouthError as exc:
            raise PluginError(f"plug-in {__name__}.{name}: {exc}") from None


_register_modules()

__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "method_named", "register_method"]
