"""Methods: declared recipes of features (how latents, noise, conditioning, taps and attention maps
are made), read by the extractor and the recipes. Vermouth is the one shipped today.

    method = method_named(req.method)   # a Method; see `base` for what one declares

A new method: `methods/<name>.py` building a `Method` and calling `register_method`, added to
BUILT_IN below so that it ships with the package (a test or a plug-in may register one at run time).
"""

from __future__ import annotations

from vermouth_cache.methods import vermouth
from vermouth_cache.methods.base import METHODS, Method, method_named, register_method

BUILT_IN = (vermouth.VERMOUTH,)  # each registered itself when its module was imported
DEFAULT_METHOD = BUILT_IN[0].name

__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "method_named", "register_method"]
