"""`vermouth-cache sweep RECIPE --out DIR`: a thin layer over `vermouth_cache.sweep`."""

from __future__ import annotations

import click

from vermouth_cache.core.errors import VermouthError


def _variables(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise VermouthError(f"--set takes NAME=VALUE, got {item!r}")
        out[name] = value
    return out


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", required=True, help="Sweep directory: runs/<point>/, results.csv, results.md, plots/, sweep.json.")
@click.option("--store", help="Feature store to read and fill (default: OUT/store). Share one across sweeps.")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE",
              help="A recipe variable, e.g. --set COOP=/data/coop for ${COOP}; repeatable.")
@click.option("--config", type=click.Path(dir_okay=False),
              help="A YAML file of recipe variables (NAME: VALUE), e.g. this machine's dataset paths.")
@click.option("--workers", type=int, help="Local dask workers extracting shards and training points in parallel "
                                         "[one per GPU, else 1].")
@click.option("--scheduler", metavar="ADDRESS", help="Extract and train on the dask cluster at tcp://HOST:PORT instead "
                                                     "of a local one.")
@click.option("--device", help="cpu, cuda or cuda:N for extraction and training (default: cuda when present; "
                               "local workers take one GPU each).")
@click.option("--memory-gb", type=float, default=8.0, show_default=True,
              help="Per run: hold features in (GPU) memory up to this size, else stream them from the store.")
@click.option("--dry-run", is_flag=True, help="Print the plan (cache entries present and to extract, with sizes; "
                                              "training passes) and stop.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def sweep(recipe, out, store, sets, config, workers, scheduler, device, memory_gb, dry_run, quiet):
    """Run an ablation grid from one cache: extract only what the store lacks, train every
    unfinished point (heads that differ only in head settings share one pass over the features),
    and write results.csv, results.md and plots. Rerun the same command to resume.

    RECIPE is a YAML file, or the name of a pipeline installed with the package (demo.yaml,
    table4_fewshot.yaml, ...: the files of pipelines/)."""
    from vermouth_cache.sweep import SweepOptions, load_recipe
    from vermouth_cache.sweep import dry_run as plan
    from vermouth_cache.sweep import run_sweep

    if workers is not None and workers < 1:
        raise VermouthError("--workers must be at least 1")
    if not 0 <= memory_gb < float("inf"):  # also refuses nan
        raise VermouthError(f"--memory-gb must be a finite number of GiB >= 0, got {memory_gb}")
    from vermouth_cache.core.atomic import output_directory
    from vermouth_cache.store.entries import refuse_inside_store

    refuse_inside_store(out, "sweep directory")
    output_directory(out, "sweep directory")
    r = load_recipe(recipe, _variables(sets), config)
    opts = SweepOptions(out=out, store=store, workers=workers, scheduler=scheduler, device=device,
                        memory_gb=memory_gb, progress=not quiet)
    if dry_run:
        click.echo(plan(r, opts))
        return
    result = run_sweep(r, opts)
    n_done = sum(rec["status"] == "done" for rec in result.records)
    click.echo(f"{n_done}/{len(result.records)} points done ({result.trained} trained now); "
               f"report: {result.report['md']}")
    for rec in result.records:
        if rec["status"] != "done":
            click.echo(f"  {rec['point']}: {rec['status']}", err=True)
    if n_done < len(result.records):
        raise VermouthError(f"{len(result.records) - n_done} point(s) failed; see above")
