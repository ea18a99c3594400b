"""The demo end to end, and the CLI's ls / export / models / --shots paths."""

from __future__ import annotations

import h5py

from conftest import DEMO_SPLIT
from conftest import cli
from vermouth_cache.demo import run_demo


def test_demo_runs_and_learns_from_the_cache(tmp_path):
    res = run_demo(tmp_path / "demo", progress=False)
    m = res.metrics
    assert m["n"] == {"train": 24, "val": 6, "test": 6} and len(m["per_class_top1"]) == 3
    assert res.accuracy > 1 / 3  # deterministic on the CPU; above chance
    assert (res.run / "head.safetensors").is_file() and (res.run / "curve.png").is_file()
    for split in ("train", "val", "test"):
        assert f"Demo/{split}" in res.listing
    assert res.reports["train"].computed["unet"] == 24
    again = run_demo(tmp_path / "demo", progress=False)  # a rerun computes nothing, same figure
    assert not any(again.reports["train"].computed.values()) and again.metrics == res.metrics


def test_cli_extract_shots_ls_export(monkeypatch, capsys, tiny, tmp_path):
    store = tmp_path / "store"
    code, out, err = cli(monkeypatch, capsys, "extract", DEMO_SPLIT, "--split", "train", "--shots", "2", "--store",
                         store, "--sd-model", tiny["sd"], "--captioner", tiny["blip"], "--resolution", "128",
                         "--device", "cpu", "--quiet", "--t", "50,100", "--stages", "mid", "--prompt", "classname")
    assert code == 0, err
    assert "Demo/train/2-shot-seed0: 6 samples" in out and "features t=50" in out
    code, out, _ = cli(monkeypatch, capsys, "ls", store, "--kind", "features")
    assert code == 0 and out.count("6/6") == 2 and "classname" in out
    code, _, err = cli(monkeypatch, capsys, "export", store, "--out", tmp_path / "x.h5")
    assert code == 1 and "2 feature entries" in err and "--entry" in err
    key = next(line.split()[1] for line in out.splitlines() if " 100 " in line)
    code, out, err = cli(monkeypatch, capsys, "export", store, "--out", tmp_path / "x.h5", "--entry", key[:6])
    assert code == 0, err
    with h5py.File(tmp_path / "x.h5") as f:
        assert f["features/mid_block"].shape[0] == 6
        assert all(c.decode().startswith("a photo of a ") for c in f["captions"][:])
        assert f.attrs["about.uses_label"]


def test_cli_models_tiny_and_help(monkeypatch, capsys, tmp_path):
    code, out, _ = cli(monkeypatch, capsys, "models", "tiny", tmp_path / "m")
    assert code == 0 and (tmp_path / "m" / "sd" / "model_index.json").is_file() and "blip" in out
    code, out, _ = cli(monkeypatch, capsys, "extract", "--help")
    assert code == 0
    for option in ("--t", "--stages", "--taps", "--attn-maps", "--expert", "--prompt", "--noise", "--noise-draws",
                   "--dtype", "--batch-size", "--device", "--on-error", "--shots", "--text-layer", "--resolution"):
        assert option in out
