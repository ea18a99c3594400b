"""Extraction: a request becomes a plan of missing shards, computed batch by batch (here or on a
dask cluster) and committed to the store; also the class-text and label-map entries."""
