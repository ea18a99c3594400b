"""`vermouth-cache tables make | convert | show`: the context tables VPD conditions on (a thin
layer over `extract.context_tables` and `data.tables`)."""

from __future__ import annotations

from pathlib import Path

import click

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.models.loading import DEFAULT_CLIP_MODEL


def _names(spec: str) -> list[str]:
    """Class names from a bundled list (ade150, ...), a text file (one per line), or a depth root
    (its scene classes, as `train depth` reads them)."""
    from vermouth_cache.data.depth import is_depth_root, scene_classes
    from vermouth_cache.data.vocab import classnames, read_name_list

    if is_depth_root(Path(spec)):
        return list(scene_classes(Path(spec)))
    return list(read_name_list(spec) if Path(spec).is_file() else classnames(spec))


@click.group()
def tables():
    """Context tables: rows of text features that condition the U-net (vpd's --context-table)."""


@tables.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--classes", required=True, metavar="LIST",
              help="Class names: a bundled list (ade150, pc59, ...), a text file with one name per line, or a "
                   "depth root (its scene classes).")
@click.option("--templates", "template_set", default=None, metavar="NAME",
              help="A bundled template set (e.g. imagenet_ensemble: CLIP's 80, as VPD's NYU table) [default: "
                   "'a photo of a {}.', as VPD's ADE20K table is read].")
@click.option("--template", "template_list", multiple=True, metavar="TEXT",
              help="A template with {} for the class name; repeat for several (instead of --templates).")
@click.option("--clip", "clip_model", default=DEFAULT_CLIP_MODEL, show_default=True,
              help="CLIP text model (hub id or directory), or an SD pipeline directory (its own text encoder).")
def make(out, classes, template_set, template_list, clip_model):
    """Write OUT (.safetensors): one row per class, the plain mean over templates of CLIP's
    pooled output (no normalisation), as VPD's dump_nyu_text_embeddings.py."""
    from vermouth_cache.data.vocab import template_sets, templates
    from vermouth_cache.extract.context_tables import make_table

    if template_set and template_list:
        raise VermouthError("give --templates or --template, not both")
    if template_set and template_set.lower() not in template_sets():
        raise VermouthError(f"unknown template set {template_set!r} (choose from {', '.join(template_sets())})")
    chosen = list(template_list) or (list(templates(template_set)) if template_set else ["a photo of a {}."])
    names = _names(classes)
    path = make_table(out, clip_model, names, chosen)
    _show(path)


@tables.command()
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--classes", default=None, metavar="LIST",
              help="Names of the rows in order: a bundled list or a text file [default: row0, row1, ...].")
def convert(src, out, classes):
    """Convert VPD's SRC .pth table (e.g. class_embeddings.pth) to OUT (.safetensors). The pickle
    inside is read without resolving a single global, so a hostile file runs nothing."""
    from vermouth_cache.data.tables import convert_pth

    _show(convert_pth(src, out, rows=_names(classes) if classes else None))


@tables.command()
@click.argument("table", type=click.Path(dir_okay=False))
def show(table):
    """Print a table's shape, sha256 (its identity in keys), provenance and first rows."""
    _show(table)


def _show(path) -> None:
    from vermouth_cache.data.tables import read_table

    t = read_table(path)
    norms = (t.values ** 2).sum(1) ** 0.5
    click.echo(f"{t.path}: {t.values.shape[0]} rows x {t.values.shape[1]}, sha256 {t.sha256}")
    click.echo(f"  rows: {', '.join(t.rows[:8])}{' ...' if len(t.rows) > 8 else ''}")
    click.echo(f"  row L2 norm {norms.min():.3g}-{norms.max():.3g}; made by: "
               + ", ".join(f"{k}={v}" for k, v in t.about.items() if k != "templates"))
