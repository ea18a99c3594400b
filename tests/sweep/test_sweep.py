"""`vermouth-cache sweep` end to end on pipelines/demo.yaml (bundled images, tiny models): the plan,
one merged extraction, heads sharing passes, resume after a kill, the report, recipe errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vermouth_cache.cli.main import main
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.sweep import SweepOptions, dry_run, load_recipe, run_sweep

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "pipelines" / "demo.yaml"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    recipe = load_recipe(DEMO)
    opts = SweepOptions(out=str(out), progress=False)
    before = dry_run(recipe, opts)
    result = run_sweep(recipe, opts)
    return {"out": out, "recipe": recipe, "opts": opts, "before": before, "result": result}


def test_dry_run_lists_entries_sizes_and_passes(swept):
    text = swept["before"]
    assert "8 points, 0 finished, 8 to train" in text
    # one merged request per split covers both timesteps and the union of the stages
    assert text.count("t=10,200 stages=down,mid,up attn=up expert=resnet18") == 3
    assert "features" in text and "missing" in text and "KB to write" in text
    assert "training passes: 2" in text  # the 4 heads of one t share a pass
    after = dry_run(swept["recipe"], swept["opts"])
    assert "8 finished, 0 to train" in after and "training passes" not in after


def test_sweep_extracts_once_and_trains_every_point(swept):
    res = swept["result"]
    assert res.trained == 8 and all(r["status"] == "done" for r in res.records)
    # captions, text and latents once per split; the U-net once per (split, t) for all stages
    train = next(e for e in res.extracted if "train" in e["dataset"])
    assert train["t"] == [10, 200]
    assert train["computed"]["caption"] == 24 and train["computed"]["vae"] == 24
    assert train["computed"]["unet"] == 48
    assert {r["heads_in_pass"] for r in res.records} == {4}


def test_report_matches_the_runs(swept):
    out = swept["out"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["point"] for r in rows] == [p.name for p in swept["recipe"].points]
    for row in rows:
        run = out / row["run"]
        metrics = json.loads((run / "metrics.json").read_text())
        config = json.loads((run / "config.json").read_text())
        assert float(row["top1"]) == metrics["top1"]
        assert row["features_key"] == metrics["entries"]["train"]["features"]
        assert int(row["t"]) == config["settings"]["t"] and row["stages"] == config["settings"]["stages"]
        assert row["head"] == config["settings"]["head"] and config["heads_in_pass"] == 4
        assert (run / "head.safetensors").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "8 points: 8 done, 0 failed" in md
    for name in ("timestep.png", "ablation_stages.png", "ablation_head.png"):
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "sweep.json").read_text())["points"] == [p.name for p in swept["recipe"].points]


def test_a_head_in_a_shared_pass_equals_the_head_trained_alone(swept, tmp_path):
    """Retraining one point alone (the others finished) gives the same weights it got in its pass of 4."""
    from safetensors.torch import load_file

    out = swept["out"]
    name = "demo-t_200-stages_down+mid-head_linear"
    shared = load_file(out / "runs" / name / "head.safetensors")
    shared_metrics = json.loads((out / "runs" / name / "metrics.json").read_text())
    (out / "runs" / name / "point.json").unlink()
    res = run_sweep(swept["recipe"], swept["opts"])
    assert res.trained == 1 and res.seconds.get("extract", 0) < 5
    alone = load_file(out / "runs" / name / "head.safetensors")
    assert alone.keys() == shared.keys() and all((alone[k] == shared[k]).all() for k in alone)
    assert json.loads((out / "runs" / name / "metrics.json").read_text())["top1"] == shared_metrics["top1"]
    assert json.loads((out / "runs" / name / "point.json").read_text())["heads_in_pass"] == 1


def test_a_finished_sweep_only_rebuilds_its_report(swept):
    out = swept["out"]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    (out / "results.md").unlink()
    res = run_sweep(swept["recipe"], swept["opts"])
    assert res.trained == 0 and res.extracted == []
    assert (out / "results.md").is_file()
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}


def test_killed_sweep_resumes_with_only_unfinished_points(swept, tmp_path):
    """kill -9 the whole process group once the first pass has finished; the rerun trains the rest
    (on a dask cluster given by --scheduler) and its report equals an uninterrupted sweep's."""
    out = tmp_path / "killed"
    store = swept["out"] / "store"  # already holds every feature: the subprocess goes straight to training
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "vermouth_cache.cli", "sweep", str(DEMO), "--out", str(out), "--store", str(store),
           "--quiet"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list(out.glob("runs/*/point.json"))) >= 4:
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = {p.parent.name for p in out.glob("runs/*/point.json")}
    assert 4 <= len(finished) < 8, proc.stderr.read().decode()[-2000:]

    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        res = run_sweep(swept["recipe"], SweepOptions(out=str(out), store=str(store), scheduler=cluster.scheduler_address,
                                                      progress=False))
    assert res.trained == 8 - len(finished)
    ours = {r["point"]: r["scores"] for r in res.records}
    reference = {r["point"]: r["scores"] for r in swept["result"].records}
    assert ours == reference


def test_recipe_errors_name_the_culprit(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace("grid:", "gird:"))
    with pytest.raises(VermouthError, match=r"unknown key\(s\) gird"):
        load_recipe(bad)
    bad.write_text(DEMO.read_text().replace("head: [uhead, linear]", "head: [uhead, lineer]"))
    with pytest.raises(VermouthError, match="lineer"):
        load_recipe(bad)
    bad.write_text(DEMO.read_text().replace("${BUNDLED}", "${COOP}"))
    with pytest.raises(VermouthError, match=r"needs \$\{COOP\}: give --set COOP=VALUE"):
        load_recipe(bad)
    assert load_recipe(bad, {"COOP": str(REPO / "data")}).points
    bad.write_text(DEMO.read_text().replace("head: [uhead, linear]", "prompt: [blip, null]"))
    with pytest.raises(VermouthError, match='write "null" in quotes'):
        load_recipe(bad)
    bad.write_text(DEMO.read_text().replace("  t: [10, 200]", "  t: [10, 1000]"))
    with pytest.raises(VermouthError, match="1000 is outside 0-999"):
        load_recipe(bad)
    # the command line: one line on stderr, exit 1, no traceback
    from vermouth_cache.cli.main import run

    bad.write_text(DEMO.read_text().replace("epochs: 15", "epochz: 15"))
    monkeypatch.setattr(sys, "argv", ["vermouth-cache", "sweep", str(bad), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exc:
        run()
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "epochz" in err and "Traceback" not in err
    assert main is not None


def test_sweep_help_explains_every_option():
    from click.testing import CliRunner

    text = CliRunner().invoke(main, ["sweep", "--help"]).output
    for opt in ("--out", "--store", "--set", "--config", "--workers", "--scheduler", "--device", "--memory-gb",
                "--dry-run", "--quiet"):
        assert opt in text
