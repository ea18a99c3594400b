"""`vermouth-cache verify | repair | gc STORE`: checking and mending a store (a thin layer over
`store.check.verify`, `extract.repair.repair` and `store.gc`)."""

from __future__ import annotations

import click

from vermouth_cache.core.errors import VermouthError


@click.command()
@click.argument("store")
@click.option("--deep", is_flag=True, help="Also read every chunk and check its CRC32C (reads the whole store).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify(store, deep, quiet):
    """Check STORE (opened read-only): manifests, records, chunk sizes, and with --deep every
    checksum. Names every bad shard and its samples; exit status 1 when any is found."""
    from vermouth_cache.store.check import verify as run_verify
    from vermouth_cache.store.entries import Store

    v = run_verify(Store(store, read_only=True), deep=deep, progress=not quiet)
    click.echo(v.summary())
    if not v.ok:
        raise VermouthError(f"{len(v.problems)} problem(s) in {store}; `vermouth-cache repair {store}` recomputes "
                            "the bad shards")


@click.command()
@click.argument("store")
@click.option("--shallow", is_flag=True, help="Find damage by sizes only (no full read); misses flipped bytes.")
@click.option("--device", help="cpu, cuda or cuda:N for the recomputation (default: as extracted, else cuda when present).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def repair(store, shallow, device, quiet):
    """Recompute exactly the shards `verify` finds bad in STORE, from the dataset and models named in
    each entry's manifest (refused if they changed since), then verify again."""
    from vermouth_cache.extract.repair import repair as run_repair
    from vermouth_cache.store.entries import Store

    rep = run_repair(Store(store), deep=not shallow, progress=not quiet, device=device)
    for entry, arrays in rep.repaired.items():
        click.echo(f"repaired {entry}: " + "; ".join(f"{a} shard(s) {', '.join(map(str, s))}" for a, s in arrays.items()))
    if rep.claims_removed or rep.debris_removed:
        click.echo(f"removed {rep.claims_removed} dead claim file(s), {rep.debris_removed} temporary file(s) of "
                   "killed writers")
    if not rep.repaired and not rep.refused:
        click.echo("nothing to repair")
    for entry, why in rep.refused.items():
        click.echo(f"cannot repair {entry}: {why}", err=True)
    click.echo(rep.after.summary())
    if rep.refused or not rep.after.ok:
        raise VermouthError("the store still has problems; see above")


@click.command()
@click.argument("store")
@click.option("--unused-days", type=float, help="Remove entries not extracted into, trained from or exported for N days.")
@click.option("--entry", "entries", multiple=True, metavar="KIND/KEY",
              help="Remove this entry (a key prefix is enough); repeatable.")
@click.option("--yes", is_flag=True, help="Do not ask before deleting.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
def gc(store, unused_days, entries, yes, dry_run):
    """Remove entries of STORE, named or unused for N days, after listing them and asking."""
    from vermouth_cache.store.gc import remove, select
    from vermouth_cache.store.listing import human_bytes
    from vermouth_cache.store.entries import Store

    st = Store(store)
    kept = []
    doomed = select(st, unused_days=unused_days, names=tuple(entries), kept=kept)
    for k in kept:
        click.echo(k.line())
    if not doomed:
        click.echo("nothing to remove")
        return
    total = sum(d.bytes for d in doomed)
    click.echo(f"{len(doomed)} entr{'y' if len(doomed) == 1 else 'ies'}, {human_bytes(total)}:")
    for d in doomed:
        click.echo("  " + d.line())
    if dry_run:
        return
    if not yes and not click.confirm("delete them?", default=False):
        click.echo("nothing deleted")
        return
    freed = remove(st, doomed)
    click.echo(f"deleted {len(doomed)} entr{'y' if len(doomed) == 1 else 'ies'}, {human_bytes(freed)} freed")
