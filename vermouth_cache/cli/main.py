"""The `vermouth-cache` command: a thin layer over the Python API (extract, ls, export, train, demo).

Errors the user can fix print as one line on stderr with exit status 1; no tracebacks.
"""

from __future__ import annotations

import logging
import sys

import click
from pathlib import Path

from vermouth_cache import __version__
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.progress import configure_logging
from vermouth_cache.cli.options import pin_options, request_options, typed_options
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.store.entries import KINDS


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, package_name="vermouth-cache")
@click.pass_context
def main(ctx):
    """Stable Diffusion features for perception, computed once and cached in Zarr.

    Progress goes to stderr: bars on a terminal, one line per stage otherwise (a log file).
    Every command takes --quiet (warnings and errors only) and --verbose (debug messages).
    """
    if not ctx.find_root().meta.get("vermouth_cache.verbosity"):
        configure_logging(logging.INFO)


# the features `export --dataset` selects: the extraction options that change them
EXPORT_QUERY = ("split", "image_root", "layout", "method", "t", "resolution", "prompt", "noise", "text_layer")


@main.command()
@request_options(ExtractRequest)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(quiet, **fields):
    """Extract SD features of DATASET into the store, computing only what it lacks.

    DATASET is an image-folder tree (root/<class>/<image>), a CoOp split file
    (split_zhou_<Name>.json, with --split), a CSV/JSONL manifest (path, label, split, ...), a
    segmentation dataset root (images + PNG label maps, with --split and --layout), a depth or
    REFER root (with --split), WebDataset tar shards (a .tar file or a folder of them), or a
    Hugging Face dataset saved with save_to_disk (with --split for a DatasetDict).
    """
    from vermouth_cache.extract.run import extract as run_extract

    req = ExtractRequest(**typed_options(fields), progress=not quiet)
    report = run_extract(req)
    ds = report.dataset
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(f"dataset {ds['name']}: {ds['n_samples']} samples, identity {ds['identity'][:16]}")
    for name, key in report.entries.items():
        click.echo(f"  {name:<16} {key}")
    done = ", ".join(f"{k} {v}" for k, v in report.computed.items() if v) or "nothing (all cached)"
    click.echo(f"computed: {done}")
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
    click.echo(f"time: {report.wall_seconds:.1f}s ({secs})" if secs else f"time: {report.wall_seconds:.1f}s")
    if report.waited_seconds:
        click.echo(f"waited {report.waited_seconds:.0f}s for shards other writers were computing")
    if report.failed:
        click.echo(f"{len(report.failed)} sample(s) failed and were recorded:", err=True)
        for sid, why in list(report.failed.items())[:10]:
            click.echo(f"  {sid}: {why}", err=True)


@main.command("ls")
@click.argument("store")
@click.option("--kind", type=click.Choice(list(KINDS)),
              help="Only entries of this kind.")
def ls_cmd(store, kind):
    """List the entries of STORE (a directory or URL, opened read-only): dataset, model, method, t, taps,
    resolution, prompt, noise, progress, size."""
    from vermouth_cache.models.taps import summarize_taps
    from vermouth_cache.store.listing import table
    from vermouth_cache.store.entries import Store

    click.echo(table(Store(store, read_only=True), kind, summarize_taps=summarize_taps))


@main.command()
@click.argument("store")
@click.option("--out", required=True, help="HDF5 file to write (through a temporary name).")
@click.option("--entry", help="Key (or key prefix) of the feature entry; needed when the store has several.")
@click.option("--taps", help="Taps to export, comma-separated (default: all of the entry's).")
@click.option("--dataset", help="Instead of --entry: the features of this dataset matching --t, --resolution, "
                                "--prompt, --noise, --text-layer and the options below (refused, naming the fields "
                                "that differ, if none does).")
@request_options(ExtractRequest, only=EXPORT_QUERY, help_prefix="With --dataset: ",
                 helps={"t": "The timestep 0-999 of the features (one per export)."})
@click.option("--sd-model", help="With --dataset: only features of this SD model (hub id or directory) [any].")
@click.option("--expert", "with_expert", is_flag=True, help="Also export the dataset's expert maps at the same "
                                                            "resolution as /expert/<level>.")
@click.option("--expert-entry", help="Key (or prefix) of the expert entry, when the store has several for the dataset.")
@click.option("--compression", type=click.Choice(["gzip", "lzf"]), help="Compress the HDF5 datasets (h5py's own "
                                                                       "filters; none by default).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@pin_options
def export(store, out, entry, taps, dataset, sd_model, with_expert, expert_entry, compression, quiet, **options):
    """Export one feature entry of STORE to HDF5: /sample_ids, /labels, /captions, /features/<tap>
    [, /expert/<level>], streamed one store shard at a time."""
    from vermouth_cache.store.export import expert_of, export_h5, select_features_entry
    from vermouth_cache.extract.selection import find_features, pop_pins
    from vermouth_cache.store.entries import Store

    ds = query = None
    pins = pop_pins(options)
    if dataset:
        if entry:
            raise VermouthError("give --entry or --dataset, not both")
        from vermouth_cache.extract.selection import FeatureQuery, resolve_pins

        # validated as an extraction would be; the method's fixed fields fill what was not typed
        table = {"context_table": pins["table"]} if pins.get("table") else {}  # also a pin: what selects them
        want = ExtractRequest(dataset=dataset, store=store, **typed_options(options), **table)
        if len(want.t) != 1:
            raise VermouthError(f"--t: export one timestep at a time (got {','.join(map(str, want.t))})")
        ds = want.load_dataset()
        unet = None
        if sd_model:
            from vermouth_cache.train.common import RunOptions, unet_identity

            unet = unet_identity(RunOptions(store=store, sd_model=sd_model))
        query = FeatureQuery(t=want.t[0], resolution=want.resolution, prompt=want.prompt, noise=want.noise,
                             text_layer=want.text_layer, unet=unet, method=want.method, pins=resolve_pins(pins))
    elif pins or sd_model or typed_options(options):
        raise VermouthError("--sd-model and the options that select features by recipe go with --dataset "
                            "(--entry names the entry itself)")
    st, taps = Store(store), [t.strip() for t in taps.split(",")] if taps else None
    found = find_features(st, ds, query, arrays=taps) if ds is not None else None  # else --entry, or the only one
    if expert_entry and not with_expert:
        raise VermouthError("--expert-entry chooses the expert entry of --expert")
    exp = None
    if with_expert:
        exp = expert_of(st, found or select_features_entry(st, entry), expert_entry)
    res = export_h5(st, out, entry=found, entry_key=entry, taps=taps, expert=exp, compression=compression,
                    progress=not quiet)
    click.echo(f"wrote {res['path']}: {res['samples']} samples, taps {', '.join(res['taps'])}"
               + (f", expert {res['expert'][:12]}" if res["expert"] else "")
               + (f" ({res['excluded']} failed samples excluded)" if res["excluded"] else ""))


@main.command()
@click.argument("run")
@click.argument("images")
@click.option("--out", required=True, help="Directory for predictions.json, the maps (PNG) and images.csv.")
@click.option("--top-k", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="fewshot: classes per image; sbir: nearest gallery photos per sketch.")
@click.option("--text", help="refer: the sentence whose object to segment (every image).")
@click.option("--classname", help="A prompt that reads the label (VPD depth's table-class): the class of every image.")
@click.option("--store", help="Store to read and write features in [the run's].")
@click.option("--device", help="cpu, cuda or cuda:N (default: cuda when present).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def predict(run, images, out, top_k, text, classname, store, device, quiet):
    """Apply RUN's head to IMAGES (an image or a folder): features made with the run's own recipe
    into its store (reused when already there), then top-k classes (fewshot), nearest photos (sbir)
    or a map beside each image (seg, depth, refer)."""
    from vermouth_cache.core.atomic import output_directory
    from vermouth_cache.train.predict import predict as run_predict

    res = run_predict(run, images, output_directory(out, "prediction directory"), top_k=top_k, text=text,
                      classname=classname, store=store, device=device, progress=not quiet)
    for p in res["predictions"]:
        if "top" in p:
            click.echo(f"{p['id']}: " + ", ".join(f"{t['class']} {t['p']:.3f}" for t in p["top"]))
        elif "nearest" in p:
            click.echo(f"{p['id']}: " + ", ".join(f"{t['photo']} ({t['class']}) {t['cosine']:.3f}" for t in p["nearest"]))
        else:
            click.echo(f"{p['id']}: {p['png']}")
    _say_notes(res)
    click.echo(f"{res['images']} images ({len(res['skipped'])} unreadable; {_reuse_line(res)}) -> "
               f"{Path(out) / 'predictions.json'}")


def _reuse_line(res: dict) -> str:
    """How many images predict/embed read from rows already stored, and how many went through extraction."""
    models = ("caption", "text", "vae", "expert", "unet")
    computed = ", ".join(f"{k} {v}" for k, v in sorted(res["computed"].items()) if v and k in models)
    return (f"features of {res['reused']} reused from the store, {res['extracted']} extracted"
            + (f" ({computed} samples computed)" if computed else " (nothing computed)" if res["extracted"] else ""))


def _say_notes(res: dict) -> None:
    notes = res.get("notes") or []
    for n in notes[:3]:
        click.echo(f"note: {n}", err=True)
    if len(notes) > 3:
        click.echo(f"note: {len(notes) - 3} more in the output's JSON", err=True)


@main.command()
@click.argument("run")
@click.argument("images")
@click.option("--out", required=True, help="Directory for embeddings.npz (ids, embeddings) and images.csv.")
@click.option("--store", help="Store to read and write features in [the run's].")
@click.option("--device", help="cpu, cuda or cuda:N (default: cuda when present).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def embed(run, images, out, store, device, quiet):
    """The pooled U-head embedding of each image in IMAGES under RUN's head (fewshot, sbir)."""
    from vermouth_cache.core.atomic import output_directory
    from vermouth_cache.train.predict import embed as run_embed

    res = run_embed(run, images, output_directory(out, "embedding directory"), store=store, device=device,
                    progress=not quiet)
    _say_notes(res)
    click.echo(f"{res['images']} embeddings of {res['dim']} dims ({_reuse_line(res)}) -> {res['path']}")


@main.group()
def models():
    """Model utilities."""


@models.command("tiny")
@click.argument("directory")
@click.option("--seed", type=int, default=0, show_default=True, help="Weights seed; same seed, same bytes.")
def models_tiny(directory, seed):
    """Write tiny random models in the real on-disk formats to DIRECTORY (sd, blip, experts, clip)."""
    from vermouth_cache.core.atomic import output_directory
    from vermouth_cache.models.tiny import write_tiny_models

    for name, path in write_tiny_models(output_directory(directory, "model directory"), seed=seed).items():
        click.echo(f"{name:<10} {path}")


@main.command()
@click.option("--out", default="demo-out", show_default=True, help="Directory for tiny models, store and results.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out, quiet):
    """Run the whole flow on tiny models and the bundled demo data: extract, ls, train fewshot."""
    from vermouth_cache.core.atomic import output_directory
    from vermouth_cache.demo import run_demo

    res = run_demo(output_directory(out, "demo directory"), progress=not quiet)
    m = res.metrics
    click.echo(res.listing)
    click.echo(f"\nfew-shot U-head trained from the cache (t=10, mid+up, up attention maps, ResNet-18 expert): "
               f"top-1 {m['top1']:.3f} on {m['n']['test']} test images (val {m['val_top1']:.3f}; "
               f"{len(m['per_class_top1'])} classes, {m['n']['train']} training images, chance {m['chance']:.3f}); "
               f"run in {res.run}.\nThe tiny models are random: this checks the flow, not the method. "
               f"The README shows the real-model commands.")


from vermouth_cache.cli.train import train  # noqa: E402  (train and sweep live in their own modules)

main.add_command(train)

from vermouth_cache.cli.sweep import sweep  # noqa: E402

main.add_command(sweep)

from vermouth_cache.cli.store import gc, repair, verify  # noqa: E402
from vermouth_cache.cli.tables import tables  # noqa: E402

for _command in (verify, repair, gc, tables):
    main.add_command(_command)


# ---- --quiet / --verbose on every command (and on the group: `vermouth-cache --quiet demo`) ----------

QUIET_HELP = "Warnings and errors only: no progress bars or progress lines."
VERBOSE_HELP = "Also debug messages (per-epoch lines, store and model details)."


def _verbosity(ctx: click.Context, param: click.Parameter, value):
    """Set the package logger's level from --quiet / --verbose as soon as one is parsed."""
    if value:
        chosen = ctx.find_root().meta.setdefault("vermouth_cache.verbosity", set())
        chosen.add(param.name)
        if len(chosen) > 1:
            raise click.UsageError("give --quiet or --verbose, not both", ctx=ctx)
        configure_logging(logging.WARNING if param.name == "quiet" else logging.DEBUG)
    return value


def _chain(callback):
    def both(ctx, param, value):
        value = callback(ctx, param, value) if callback else value
        return _verbosity(ctx, param, value)
    return both


def add_verbosity_options(command: click.Command) -> None:
    """Give `command` and every subcommand -q/--quiet and -v/--verbose. A command's own `--quiet`
    (its function takes `quiet`, to switch its progress off) keeps working and sets the level too."""
    names = {p.name: p for p in command.params}
    if "quiet" in names:
        names["quiet"].callback = _chain(names["quiet"].callback)
        names["quiet"].help = QUIET_HELP
        if "-q" not in names["quiet"].opts:
            names["quiet"].opts.insert(0, "-q")
    else:
        command.params.append(click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, is_eager=True,
                                           callback=_verbosity, help=QUIET_HELP))
    if "verbose" not in names:
        command.params.append(click.Option(["-v", "--verbose"], is_flag=True, expose_value=False, is_eager=True,
                                           callback=_verbosity, help=VERBOSE_HELP))
    for sub in getattr(command, "commands", {}).values():
        add_verbosity_options(sub)


add_verbosity_options(main)


def run() -> None:
    """Entry point: user errors become one line and exit 1; Ctrl-C says how to resume."""
    try:
        # click's own `main` turns Ctrl-C into Abort after printing a blank line: invoked directly,
        # Ctrl-C reaches the one-line message below
        with main.make_context("vermouth-cache", sys.argv[1:]) as ctx:
            main.invoke(ctx)
    except VermouthError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again to resume", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)

