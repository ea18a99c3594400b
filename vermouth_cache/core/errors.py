"""The errors users see: the CLI prints each message on one line and exits 1.

VermouthError is bad input or state the user can fix; ImageError one image that cannot be decoded
(recorded per sample); MissingExtra an optional dependency that is not installed.

Optional dependencies: the pip extra that brings each one, and the one-line error when it is missing.

    pip install 'vermouth-cache[s3]'      # s3fs: stores on S3 (s3://bucket/prefix)
    pip install 'vermouth-cache[dist]'    # dask.distributed: --workers / --scheduler
    pip install 'vermouth-cache[plots]'   # matplotlib: curve.png of a run, a sweep's plots
    pip install 'vermouth-cache[refer]'   # pycocotools: referring masks from COCO polygons
    pip install 'vermouth-cache[test]'    # all of the above, and what the tests need

The extras are declared in pyproject.toml; `EXTRAS` names the module each one provides, so the
code that needs one asks for it by module and the message names the extra:

    distributed = require("distributed", "running on several workers")
    if not available("matplotlib"): ...   # a figure that is a by-product is skipped, with a warning
"""

from __future__ import annotations

import importlib
from types import ModuleType


class VermouthError(Exception):
    """Bad input or state that the user can fix; the message names the culprit."""


class ImageError(VermouthError):
    """An image that cannot be decoded; carries the sample id so it can be recorded per sample."""

    def __init__(self, sample_id: str, reason: str):
        super().__init__(f"image {sample_id!r}: {reason}")
        self.sample_id = sample_id
        self.reason = reason


# module -> the extra of pyproject.toml that installs it
EXTRAS = {
    "s3fs": "s3",
    "distributed": "dist",
    "matplotlib": "plots",
    "pycocotools": "refer",
    "datasets": "hf",
}


class MissingExtra(VermouthError):
    """An optional dependency is not installed; the message names the pip extra that brings it."""


def install_hint(module: str) -> str:
    """How to get `module`: "pip install 'vermouth-cache[dist]'"."""
    return f"pip install 'vermouth-cache[{EXTRAS[module]}]'"


def available(module: str) -> bool:
    """Whether the optional `module` can be imported."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require(module: str, purpose: str) -> ModuleType:
    """The optional `module`, or a MissingExtra saying what needs it and which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{purpose} needs {module}, which is not installed: {install_hint(module)}") from None
