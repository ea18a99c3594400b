"""`python -m vermouth_cache.cli ...`: the same command as `vermouth-cache ...`."""

from vermouth_cache.cli import run

run()
