"""The files that ship inside the package: class names, prompt templates, caption words, SBIR
splits, the demo images and the paper's pipelines, found through `importlib.resources`.

In the repository they are the top-level `data/` and `pipelines/` folders; the package reaches
them through the links `vermouth_cache/bundled_data` and `vermouth_cache/bundled_pipelines`, and
a wheel build copies the files in, so an installed package and a checkout read the same bytes.

    bundled_file("words.txt")                 # -> a Path inside the installed package
    bundled_file("classnames", "ade150.txt")
    pipeline_file("table4_fewshot.yaml")
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from vermouth_cache.core.errors import VermouthError


def _root(name: str) -> Path:
    # The package is installed as plain files (a wheel or an editable checkout), never a zip, so
    # the Traversable is a real path that os-level readers (PIL, yaml, json) can open.
    return Path(str(resources.files("vermouth_cache") / name))


def data_dir() -> Path:
    """The bundled data folder (`data/` of the repository)."""
    return _root("bundled_data")


def pipelines_dir() -> Path:
    """The bundled pipeline recipes (`pipelines/` of the repository)."""
    return _root("bundled_pipelines")


def bundled_file(*parts: str) -> Path:
    """One bundled data file; a missing one is an installation problem, said in one line."""
    path = data_dir().joinpath(*parts)
    if not path.exists():
        raise VermouthError(f"bundled file {'/'.join(parts)} is missing from the installed package "
                            f"(looked in {data_dir()}); reinstall vermouth-cache")
    return path


def pipeline_file(name: str) -> Path:
    """One bundled pipeline recipe, e.g. "table4_fewshot.yaml"."""
    path = pipelines_dir() / name
    if not path.exists():
        known = ", ".join(sorted(p.name for p in pipelines_dir().glob("*.yaml")))
        raise VermouthError(f"no bundled pipeline {name!r} (bundled: {known})")
    return path
