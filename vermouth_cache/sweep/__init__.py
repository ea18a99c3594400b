"""Ablation grids from one cache: recipe -> plan -> extract what is missing -> train -> report."""

from vermouth_cache.sweep.recipe import Recipe, load_recipe
from vermouth_cache.sweep.run import SweepOptions, SweepResult, dry_run, run_sweep

__all__ = ["Recipe", "load_recipe", "SweepOptions", "SweepResult", "dry_run", "run_sweep"]
