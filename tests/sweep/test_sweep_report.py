"""The sweep report on synthetic point records: tables exactly, which plots exist, determinism."""

import csv

from conftest import grid, point
from vermouth_cache.sweep.report import series_for, show, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def variants():
    """One factor at a time: a base, stages=down, prompt=null (with paper values), a seg point scored
    on two eval sets with a head no other seg point shares, and a failed lr variant."""
    return [
        point("imagenet-base", "imagenet", {}, [("imagenet", "top1", 0.4273)],
              paper=[("imagenet", "top1", 0.3682)]),
        point("imagenet-stages_down", "imagenet", {"stages": "down"}, [("imagenet", "top1", 0.4101)],
              paper=[("imagenet", "top1", 0.3511)]),
        point("imagenet-prompt_null", "imagenet", {"prompt": "null"}, [("imagenet", "top1", 0.3999)],
              paper=[("imagenet", "top1", 0.568)]),
        point("ade20k-head_linear", "ade20k", {"head": "linear"},
              [("ade20k", "mIoU", 0.25), ("coco-stuff", "mIoU", 0.125)], task="seg"),
        point("imagenet-lr_0.0001", "imagenet", {"lr": 0.0001}, [], status="failed: loss diverged"),
    ]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_names(tmp_path):
    return sorted(p.name for p in (tmp_path / "plots").iterdir())


def test_grid_table_and_plots(tmp_path):
    paths = write_report(grid(), tmp_path, title="grid")
    rows = read_csv(paths["csv"])
    assert list(rows[0]) == ["point", "dataset", "task", "status", "t", "stages", "features_key", "expert_key",
                             "top1", "seconds", "heads_in_pass", "run"]
    assert [r["point"] for r in rows] == [r["point"] for r in grid()]
    first = rows[0]
    assert first["t"] == "200" and first["stages"] == "up" and first["status"] == "done"
    assert float(first["top1"]) == 0.40 + 200 / 10000  # full precision, a raw fraction
    assert first["features_key"] == "featimagenet-t_200-stages_up" * 3 and first["expert_key"] == ""
    assert first["seconds"] == "12.5" and first["heads_in_pass"] == "2"
    assert sorted(paths["plots"]) == sorted(str(tmp_path / "plots" / n) for n in ("timestep.png",
                                                                                  "ablation_stages.png"))
    assert plot_names(tmp_path) == ["ablation_stages.png", "timestep.png"]
    for p in paths["plots"]:
        assert open(p, "rb").read(8) == PNG

    md = open(paths["md"]).read()
    assert md.startswith("# grid\n") and "8 points: 8 done, 0 failed." in md
    assert "| 42.00 |" in md and "(paper" not in md

    # t: one series per (dataset, stages), t sorted numerically; stages: one per (dataset, t).
    ts = series_for(grid(), "t")
    assert [s.label for s in ts] == ["imagenet stages=up", "imagenet stages=down", "cub stages=up", "cub stages=down"]
    assert ts[0].ours == {"200": 0.40 + 200 / 10000, "100": 0.40 + 100 / 10000}
    st = series_for(grid(), "stages")
    assert [s.label for s in st] == ["imagenet t=200", "imagenet t=100", "cub t=200", "cub t=100"]
    assert list(st[0].ours) == ["up", "down"]  # first-appearance order for bars


def test_variants_table(tmp_path):
    paths = write_report(variants(), tmp_path)
    rows = read_csv(paths["csv"])
    assert list(rows[0]) == ["point", "dataset", "task", "status", "stages", "prompt", "head", "lr",
                             "features_key", "expert_key", "top1", "mIoU", "mIoU:coco-stuff", "paper top1",
                             "seconds", "heads_in_pass", "run"]
    by = {r["point"]: r for r in rows}
    base = by["imagenet-base"]
    # A point that varies nothing still shows its own settings of the varied keys.
    assert (base["stages"], base["prompt"], base["head"], base["lr"]) == ("up", "blip", "uhead", "1e-05")
    assert (base["top1"], base["paper top1"], base["mIoU"]) == ("0.4273", "0.3682", "")
    seg = by["ade20k-head_linear"]
    assert (seg["top1"], seg["mIoU"], seg["mIoU:coco-stuff"], seg["paper top1"]) == ("", "0.25", "0.125", "")
    failed = by["imagenet-lr_0.0001"]
    assert failed["status"] == "failed: loss diverged" and failed["lr"] == "0.0001" and failed["top1"] == ""

    md = open(paths["md"]).read()
    assert not md.startswith("#") and "5 points: 4 done, 1 failed." in md
    assert "| 42.73 (paper 36.82) |" in md and "| 39.99 (paper 56.80) |" in md
    assert "| 25.00 | 12.50 |" in md and "failed: loss diverged" in md
    assert "| featimagene |" not in md and "| featimagenet |" in md  # keys cut to 12 characters


def test_variants_plots(tmp_path):
    paths = write_report(variants(), tmp_path)
    # stages: base + stages=down share prompt=blip; the prompt=null point has no partner there.
    # prompt: base + prompt=null share stages=up, so that plot is drawn too.
    # head: the only linear-head point is seg, alone on its score datasets -> no series, no plot.
    # lr: its only non-base point failed -> no plot.
    assert plot_names(tmp_path) == ["ablation_prompt.png", "ablation_stages.png"]
    assert len(paths["plots"]) == 2 and all(open(p, "rb").read(8) == PNG for p in paths["plots"])

    (stages,) = series_for(variants(), "stages")
    assert stages.label == "imagenet" and stages.ours == {"up": 0.4273, "down": 0.4101}
    assert stages.paper == {"up": 0.3682, "down": 0.3511}
    (prompt,) = series_for(variants(), "prompt")
    assert prompt.ours == {"blip": 0.4273, "null": 0.3999}
    assert series_for(variants(), "head") == [] and series_for(variants(), "lr") == []


def test_deterministic_and_stale_plots_removed(tmp_path):
    a, b = write_report(grid(), tmp_path / "a"), write_report(grid(), tmp_path / "b")
    for name in ("csv", "md"):
        assert open(a[name], "rb").read() == open(b[name], "rb").read()
    again = write_report(grid(), tmp_path / "a")
    assert open(again["csv"], "rb").read() == open(b["csv"], "rb").read()
    # The same folder rewritten from other records: the timestep plot no longer applies.
    write_report(variants(), tmp_path / "a")
    assert plot_names(tmp_path / "a") == ["ablation_prompt.png", "ablation_stages.png"]
    assert not [p for p in (tmp_path / "a").rglob(".*")]  # no temporary files left behind


def test_show():
    assert [show(None), show(True), show(False), show(200), show(1e-05), show("up"), show([1, 2])] == \
        ["none", "on", "off", "200", "1e-05", "up", "[1, 2]"]
