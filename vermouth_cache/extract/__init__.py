"""Extraction: a request becomes a plan of missing shards, computed batch by batch (here or on a
dask cluster) and committed to the store; also the class-text and label-map entries."""

from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.extract.run import extract
from vermouth_cache.extract.shards import ExtractReport

__all__ = ["ExtractRequest", "ExtractReport", "extract"]
