"""The `vermouth-cache` command: a thin click layer over the Python API of the other packages."""

from __future__ import annotations

import sys


def run() -> None:
    """Entry point. The command's modules are imported here, inside the error handling, so that a
    plug-in that cannot be loaded (methods/, train/tasks/) is one line, not an import traceback."""
    from vermouth_cache.core.errors import VermouthError

    try:
        from vermouth_cache.cli.main import run as run_main
    except VermouthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    run_main()


def __getattr__(name: str):
    if name == "main":  # `from vermouth_cache.cli import main`: the click group
        from vermouth_cache.cli.main import main

        return main
    raise AttributeError(name)


__all__ = ["main", "run"]
