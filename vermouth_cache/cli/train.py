"""`vermouth-cache train fewshot|sbir|seg`: a thin layer over `vermouth_cache.train`.

Every setting defaults to the paper's Table 7 for the task (`--schedule fast` for its fast
schedule); each option below overrides one field, and the run's config.json records them all.
"""

from __future__ import annotations

import json

import click

from vermouth_cache.models.loading import DEFAULT_CLIP_MODEL, EXPERT_MODELS


def _setting_options(fn):
    opts = [
        click.option("--schedule", type=click.Choice(["paper", "fast"]), default="paper", show_default=True,
                     help="Table 7 settings, or the paper's fast schedule (fewshot 10 epochs, seg 8k iterations)."),
        click.option("--t", "t", type=int, help="Timestep of the cached features [Table 7: 200; seg 10]."),
        click.option("--stages", help="U-net stages merged into the pyramid: down, mid, up, down,mid, mid,up or "
                                      "down,mid,up [Table 7: fewshot down,mid; sbir and seg mid,up]."),
        click.option("--resolution", type=int, help="Input resolution of the cached features [256; seg 512]."),
        click.option("--noise", type=click.Choice(["ddpm", "ddim-inversion", "none"]),
                     help="Noise mode of the cached features [ddpm; sbir ddim-inversion]."),
        click.option("--prompt", help="Prompt mode of the cached features: blip, null, random, classname, text:... [blip]."),
        click.option("--text-layer", type=click.Choice(["final", "penultimate"]), help="Text layer of the cached condition [final]."),
        click.option("--attn-maps", help="Stage whose cached cross-attention maps join the pyramid, or none [up; sbir none]."),
        click.option("--expert", type=click.Choice([*EXPERT_MODELS, "none"]),
                     help="Adapted expert whose cached features join the pyramid, or none for the ablation [resnet18]."),
        click.option("--head", type=click.Choice(["uhead", "baseline", "linear"]),
                     help="U-head, the ablation's baseline fusion (conv per level, summed), or a linear probe [uhead]."),
        click.option("--text-proj", type=click.Choice(["on", "off"]),
                     help="Class-prompt features after (on) or before (off) CLIP's text projection [off; sbir on]."),
        click.option("--temperature", type=float, help="Cosine-logit temperature [0.2; sbir 0.02; seg 0.07]."),
        click.option("--templates", help="Prompt template set from data/templates.json [the dataset's own, else default]."),
        click.option("--lr", type=float, help="AdamW learning rate [1e-5; sbir 1e-4; seg 5e-4]."),
        click.option("--lr-schedule", type=click.Choice(["none", "exponential", "polynomial"]),
                     help="Learning-rate schedule [none; sbir exponential; seg polynomial]."),
        click.option("--weight-decay", type=float, help="AdamW weight decay [5e-4]."),
        click.option("--grad-clip", type=float, help="Gradient clipping, L2 norm [1]."),
        click.option("--batch-size", type=int, help="Training batch [64; seg 16]."),
        click.option("--epochs", type=int, help="Training epochs [fewshot 100 (fast 10); sbir 1]."),
        click.option("--iters", type=int, help="Training iterations, segmentation [120000 (fast 8000)]."),
        click.option("--eval-every", type=int, help="Validate every N epochs (fewshot) [1]."),
        click.option("--seed", type=int, help="Seed of the head's init and the batch order [0]."),
        click.option("--store", required=True, help="The feature store written by `vermouth-cache extract`."),
        click.option("--out", required=True, help="Run directory: config.json, metrics.json, head.safetensors, curve.png."),
        click.option("--sd-model", help="Use only features of this SD model (hub id or directory); needed by --tune-norms."),
        click.option("--clip-model", default=DEFAULT_CLIP_MODEL, show_default=True,
                     help="CLIP text model (with projection) for the class-prompt features."),
        click.option("--device", help="cpu, cuda or cuda:N (default: cuda when present)."),
        click.option("--memory-gb", type=float, default=8.0, show_default=True,
                     help="Hold features in (GPU) memory up to this size; larger ones stream from the store."),
        click.option("--overwrite", is_flag=True, help="Replace an existing run in --out."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    from vermouth_cache.extract.selection import pin_options

    return pin_options(fn)  # --noise-seed, --dtype, --captioner, ...: the extraction options that select features


_RUN_KEYS = ("store", "out", "sd_model", "clip_model", "device", "memory_gb", "overwrite")


def _split(task: str, kw: dict):
    """(TaskSettings, RunOptions) from the shared options; removes them from kw."""
    from vermouth_cache.extract.selection import pop_pins
    from vermouth_cache.train.common import RunOptions
    from vermouth_cache.train.settings import task_settings

    run = {k: kw.pop(k) for k in _RUN_KEYS}
    run["select"] = tuple(pop_pins(kw).items())
    run["progress"] = not kw.pop("quiet")
    schedule = kw.pop("schedule")
    proj = kw.pop("text_proj")
    settings = {k: kw.pop(k) for k in list(kw) if k in SETTING_KEYS}
    if proj is not None:
        settings["text_proj"] = proj == "on"
    return task_settings(task, schedule, **settings), RunOptions(**run)


SETTING_KEYS = ("t", "stages", "resolution", "noise", "prompt", "text_layer", "attn_maps", "expert", "head",
                "temperature", "templates", "lr", "lr_schedule", "weight_decay", "grad_clip", "batch_size", "epochs",
                "iters", "eval_every", "seed", "tune_norms")


def _report(metrics: dict, keys: list[str], out: str) -> None:
    shown = {k: metrics[k] for k in keys if k in metrics}
    click.echo(json.dumps(shown, indent=1))
    click.echo(f"run written to {out}: config.json, metrics.json, head.safetensors, curve.png")


@click.group()
def train():
    """Train a head on cached features: fewshot, sbir or seg (settings: the paper's Table 7)."""


@train.command()
@click.option("--dataset", required=True, help="CoOp split file split_zhou_<Name>.json (train/val/test splits).")
@click.option("--image-root", help="Image root of the split file (default: images/ beside it).")
@click.option("--shots", type=click.Choice(["1", "2", "4", "8", "16"]), default="16", show_default=True,
              help="Shots per class from the train split.")
@click.option("--shot-seed", type=int, default=0, show_default=True, help="Seed of the K-shot sample.")
@_setting_options
def fewshot(dataset, image_root, shots, shot_seed, **kw):
    """Few-shot classification (CoOp protocol): K-shot train, val picks the epoch, top-1 on test."""
    from vermouth_cache.train.tasks.fewshot import FewshotData, train_fewshot

    settings, opts = _split("fewshot", kw)
    m = train_fewshot(FewshotData(dataset, image_root, int(shots), shot_seed), settings, opts)
    _report(m, ["top1", "val_top1", "chance", "best_step", "steps", "n"], opts.out)


@train.command()
@click.option("--dataset", required=True,
              help="SBIR root with a photo and a sketch tree (Sketchy, TU-Berlin, QuickDraw or photo/ + sketch/).")
@click.option("--unseen", help="File of unseen class names (default: the literature's split for the dataset).")
@click.option("--name", type=click.Choice(["sketchy", "tuberlin", "quickdraw"]),
              help="Which dataset's default unseen split to use (default: guessed from the layout).")
@_setting_options
def sbir(dataset, unseen, name, **kw):
    """Zero-shot SBIR: train on seen classes, unseen sketches query unseen photos (mAP, P@K)."""
    from vermouth_cache.train.tasks.sbir import SbirData, train_sbir

    settings, opts = _split("sbir", kw)
    m = train_sbir(SbirData(dataset, unseen, name), settings, opts)
    _report(m, ["mAP@all", "mAP@200", "P@100", "P@200", "random_ranking_mAP", "steps", "n"], opts.out)


@train.command()
@click.option("--dataset", required=True, help="Training segmentation dataset root (images + PNG label maps).")
@click.option("--layout", help="Its layout: ade20k, ade847, coco-stuff, voc, pascal-context, pc459, generic "
                               "(default: detected).")
@click.option("--split", help="Its split, e.g. train2017, training, train.")
@click.option("--classnames", help="A file of class names replacing the layout's list.")
@click.option("--eval", "evals", multiple=True,
              help="Evaluation dataset PATH[:LAYOUT[:SPLIT]], with its own class names; repeatable or comma-separated.")
@click.option("--tune-norms", is_flag=True, default=None,
              help="Train the U-net's norm layers too (the paper's setting): features are recomputed online from "
                   "the cached latents, one U-net forward+backward per step; needs --sd-model.")
@_setting_options
def seg(dataset, layout, split, classnames, evals, **kw):
    """Open-vocabulary segmentation: train on one dataset, mIoU on others with their own class names."""
    from vermouth_cache.train.tasks.seg import SegData, SegSource, train_seg

    settings, opts = _split("seg", kw)
    sources = tuple(SegSource.parse(e) for item in evals for e in item.split(",") if e.strip())
    m = train_seg(SegData(SegSource(dataset, layout, split, classnames), sources), settings, opts)
    click.echo(json.dumps({k: {"mIoU": v["mIoU"], "pixel_acc": v["pixel_acc"]} for k, v in m["eval"].items()}, indent=1))
    click.echo(f"run written to {opts.out}: config.json, metrics.json, head.safetensors, curve.png")

