"""Where the modules of vermouth-cache 0.1 went: importing an old path raises one line naming the
new one, instead of a bare ModuleNotFoundError (0.2 grouped the 40 flat modules into packages).

    >>> import vermouth_cache.request
    ModuleNotFoundError: vermouth_cache.request moved to vermouth_cache.extract.request in
    vermouth-cache 0.2: import from there
"""

from __future__ import annotations

import importlib.abc
import sys

# old module (0.1) -> where its public names live now. The old modules models, extract, store and cli
# are packages now, whose __init__ exports the names the 0.1 README imported from them.
MOVED = {
    "vermouth_cache.errors": "vermouth_cache.core.errors",
    "vermouth_cache.hashing": "vermouth_cache.core.hashing",
    "vermouth_cache.atomic": "vermouth_cache.core.atomic",
    "vermouth_cache.progress": "vermouth_cache.core.progress",
    "vermouth_cache.datasets": "vermouth_cache.data.datasets",
    "vermouth_cache.images": "vermouth_cache.data.images",
    "vermouth_cache.seg_data": "vermouth_cache.data.seg",
    "vermouth_cache.sbir_data": "vermouth_cache.data.sbir",
    "vermouth_cache.synthetic": "vermouth_cache.data.synthetic",
    "vermouth_cache.vocab": "vermouth_cache.data.vocab",
    "vermouth_cache.unet_taps": "vermouth_cache.models.taps",
    "vermouth_cache.noise": "vermouth_cache.models.noise",
    "vermouth_cache.tiny_models": "vermouth_cache.models.tiny",
    "vermouth_cache.request": "vermouth_cache.extract.request",
    "vermouth_cache.recipes": "vermouth_cache.extract.recipes",
    "vermouth_cache.compute": "vermouth_cache.extract.compute",
    "vermouth_cache.cluster": "vermouth_cache.extract.cluster",
    "vermouth_cache.survey": "vermouth_cache.extract.survey",
    "vermouth_cache.classtext": "vermouth_cache.extract.classtext",
    "vermouth_cache.mask_cache": "vermouth_cache.extract.masks",
    "vermouth_cache.selection": "vermouth_cache.extract.selection",
    "vermouth_cache.store_files": "vermouth_cache.store.files",
    "vermouth_cache.storage": "vermouth_cache.store.location",
    "vermouth_cache.claims": "vermouth_cache.store.claims",
    "vermouth_cache.check": "vermouth_cache.store.check",
    "vermouth_cache.gc": "vermouth_cache.store.gc",
    "vermouth_cache.listing": "vermouth_cache.store.listing",
    "vermouth_cache.export": "vermouth_cache.store.export",
    "vermouth_cache.lazy": "vermouth_cache.store.lazy",
    "vermouth_cache.heads": "vermouth_cache.train.heads",
    "vermouth_cache.pyramid": "vermouth_cache.train.pyramid",
    "vermouth_cache.loader": "vermouth_cache.train.loader",
    "vermouth_cache.metrics": "vermouth_cache.train.metrics",
    "vermouth_cache.train.fewshot": "vermouth_cache.train.tasks.fewshot",
    "vermouth_cache.train.sbir": "vermouth_cache.train.tasks.sbir",
    "vermouth_cache.train.seg": "vermouth_cache.train.tasks.seg",
    "vermouth_cache.cli_store": "vermouth_cache.cli.store",
    "vermouth_cache.cli_train": "vermouth_cache.cli.train",
    "vermouth_cache.cli_sweep": "vermouth_cache.cli.sweep",
}

# old modules whose names went to more than one place
ALSO = {
    "vermouth_cache.check": "repair: vermouth_cache.extract.repair",
    "vermouth_cache.storage": "backends: vermouth_cache.store.local, vermouth_cache.store.remote",
    "vermouth_cache.store_files": "read_json too",
    "vermouth_cache.datasets": "Dataset, Sample: vermouth_cache.data.samples",
}


class MovedModules(importlib.abc.MetaPathFinder):
    """Consulted only after the real finders found nothing, so it never shadows a module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            also = f" ({ALSO[fullname]})" if fullname in ALSO else ""
            raise ModuleNotFoundError(f"{fullname} moved to {MOVED[fullname]}{also} in vermouth-cache 0.2: import from "
                                      "there", name=fullname)
        return None


def install() -> None:
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())
