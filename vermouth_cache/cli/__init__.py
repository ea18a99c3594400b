"""The `vermouth-cache` command: a thin click layer over the Python API of the other packages."""

from vermouth_cache.cli.main import main, run

__all__ = ["main", "run"]
