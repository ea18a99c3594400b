"""Hostile inputs found after the 0.2 redesign: each is one line naming the culprit, never a
traceback, and never writes into a store or leaves a half-made entry behind."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import DEMO_SPLIT, cli, make_images
from test_hostile_inputs import one_line
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.plugins import PluginError, discover


@pytest.mark.parametrize("source, message", [
    ("def (\n", "SyntaxError"),
    ("import nonexistent_module_for_test\n", "ModuleNotFoundError: No module named 'nonexistent_module_for_test'"),
    ("X = 1\n", "declares no THING = int(...)"),
])
def test_a_broken_plug_in_is_one_line_naming_its_file(tmp_path, monkeypatch, source, message):
    name = f"plugpkg_{tmp_path.name.replace('-', '_')}"  # a fresh package per case: imports are cached
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text("THING = 1\n")
    (pkg / "zbad.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as exc:
        list(discover(name, [str(pkg)], "THING", int))
    text = str(exc.value)
    assert "zbad.py" in text and message in text and "\n" not in text
    for module in [m for m in sys.modules if m.startswith(name)]:
        monkeypatch.delitem(sys.modules, module)


def test_outputs_inside_a_store_are_refused(monkeypatch, capsys, tiny, tmp_path):
    store = tmp_path / "store"
    code, _, err = cli(monkeypatch, capsys, "extract", DEMO_SPLIT, "--split", "val", "--store", store, "--sd-model",
                       tiny["sd"], "--captioner", tiny["blip"], "--resolution", "64", "--t", "10", "--stages", "mid",
                       "--device", "cpu", "--quiet")
    assert code == 0, err
    manifest = next(store.glob("features/*/manifest.json"))
    before = manifest.read_bytes()
    code, _, err = cli(monkeypatch, capsys, "export", store, "--out", manifest)
    one_line(code, err, "lies inside the store")
    assert manifest.read_bytes() == before
    code, _, err = cli(monkeypatch, capsys, "train", "fewshot", "--store", store, "--dataset", DEMO_SPLIT,
                       "--out", store / "features", "--clip-model", tiny["clip"])
    one_line(code, err, "run directory", "lies inside the store")
    code, _, err = cli(monkeypatch, capsys, "demo", "--out", manifest)
    one_line(code, err, "is not a directory")


@pytest.mark.parametrize("change, message", [
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"lr": float("inf")}, "lr must be a finite number"),
    ({"weight_decay": float("nan")}, "weight_decay must be a finite number"),
    ({"grad_clip": -1.0}, "grad clip > 0"),
    ({"power": -5.0}, "power must be >= 0"),
    ({"gamma": 0.0}, "gamma in (0, 1]"),
    ({"eval_every": 0}, "eval_every must be at least 1"),
    ({"templates": "nosuchset"}, "unknown template set 'nosuchset'"),
])
def test_absurd_training_settings_are_refused_up_front(change, message):
    from vermouth_cache.train.tasks import task_settings

    with pytest.raises(VermouthError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        task_settings("fewshot", **change)


@pytest.mark.parametrize("change, message", [
    ({"caption_max_tokens": 100_000_000}, "--caption-max-tokens 100000000 exceeds 256"),
    ({"noise_draws": 10 ** 11}, "--noise-draws 100000000000 exceeds 1000"),
    ({"inversion_steps": 5000}, "--inversion-steps 5000 exceeds 1000"),
    ({"scheduler": "notaurl"}, "--scheduler 'notaurl' is not a dask scheduler address"),
])
def test_absurd_extraction_options_are_refused_up_front(change, message, tmp_path):
    from vermouth_cache.extract.request import ExtractRequest

    with pytest.raises(VermouthError, match=message):
        ExtractRequest(dataset=str(tmp_path), store=str(tmp_path / "s"), **change)
    assert ExtractRequest(dataset=".", store=".", scheduler="tcp://10.0.0.1:8786").scheduler


def test_an_update_that_overflows_the_weights_is_a_divergence_not_a_saved_head():
    from vermouth_cache.train.loop import Member, fit_many
    from vermouth_cache.train.tasks import task_settings

    class Loader:
        progress = None

        def __len__(self):
            return 1

        def set_epoch(self, epoch):
            pass

        def __iter__(self):
            yield {"x": torch.ones(2, 3)}

    model = torch.nn.Linear(3, 1)
    s = task_settings("fewshot", epochs=1)

    def loss(batch):  # a finite loss (0) whose gradient is NaN: sqrt'(0) * 0
        return torch.sqrt((model.weight - model.weight.detach()).sum()) + 0 * model(batch["x"]).sum()
    (result,) = fit_many([Member(model, list(model.parameters()), loss, s)], Loader(), s)
    assert result.error and "non-finite weights" in result.error
    with pytest.raises(VermouthError, match="above 10"):
        task_settings("fewshot", lr=1e39)


def test_wrong_kinds_of_models_are_one_line_and_leave_no_entry(monkeypatch, capsys, tiny, tmp_path):
    data = make_images(tmp_path / "d", {"a": 1})
    store = tmp_path / "s"
    code, _, err = cli(monkeypatch, capsys, "extract", data, "--store", store, "--sd-model", tiny["sd"],
                       "--captioner", tiny["blip"], "--expert", "dino", "--expert-model", tiny["resnet18"],
                       "--resolution", "64", "--device", "cpu", "--quiet")
    one_line(code, err, "expert dino", "is a resnet", "not a vit model")
    assert not list(store.glob("expert/*"))
    from vermouth_cache.extract.classtext import class_text_features
    from vermouth_cache.store.entries import Store

    with pytest.raises(VermouthError, match="not a CLIP model"):
        class_text_features(Store(str(store), create=True), ["a"], ["a {}"], str(tiny["blip"]), proj=False)
    assert not list(store.glob("classtext/*"))


def test_sweep_extract_values_and_bundled_recipes(tmp_path, monkeypatch):
    from vermouth_cache.sweep.recipe import load_recipe

    bad = tmp_path / "r.yaml"
    bad.write_text("task: fewshot\ndatasets: {d: {path: x}}\nextract: {dtype: [1]}\n")
    with pytest.raises(VermouthError, match=r"extract: --dtype"):
        load_recipe(bad)
    unknown = tmp_path / "u.yaml"
    unknown.write_text("datasets: {d: {path: x, task: nosuchtask}}\n")
    with pytest.raises(VermouthError, match="unknown task 'nosuchtask'"):
        load_recipe(unknown)
    monkeypatch.chdir(tmp_path)  # a bundled pipeline by name, from anywhere (a wheel install has no pipelines/)
    assert load_recipe("demo.yaml").name == "demo"


def test_vpd_hostile_findings_are_refused_in_one_line(tmp_path):
    """Options that would do nothing on VPD features, pins that select nothing, absurd head widths,
    repeated drawn views, a malformed referring polygon: each refused, naming the culprit."""
    import json

    import numpy as np

    from vermouth_cache.data.samples import Sample
    from vermouth_cache.data.tables import write_table
    from vermouth_cache.data.views import View, drawn_views
    from vermouth_cache.extract.selection import check_pins_apply, table_pin
    from vermouth_cache.extract.targets import view_region
    from vermouth_cache.sweep.plan import _by_content
    from vermouth_cache.train.tasks import get_task, task_settings

    for kw, message in ((dict(head="baseline"), "head choose Vermouth's pyramid"),
                        (dict(stages="down"), "stages choose Vermouth's pyramid"),
                        (dict(tune_norms=True), "tune_norms choose Vermouth's pyramid"),
                        (dict(head_width=float("nan")), "head_width must be a finite"),
                        (dict(head_width=0), "head_width must be a finite"),
                        (dict(freeze_prompt_after=10**6), "at most 100000")):
        with pytest.raises(VermouthError, match=message):
            task_settings("seg", method="vpd", **kw)
    for pins, prompt, noise, message in (({"table": "deadbeef"}, "sentence", "none", "--context-table selects nothing"),
                                         ({"noise_seed": 5}, "table", "none", "--noise none draws no noise"),
                                         ({"captioner": "x"}, "sentence", "none", "has no BLIP captions"),
                                         ({"text_tokens": 40}, "table-class", "none", "reads table rows")):
        with pytest.raises(VermouthError, match=message):
            check_pins_apply(pins, prompt=prompt, noise=noise)
    check_pins_apply({"table": "deadbeef", "noise_seed": None}, prompt="table", noise="none")
    assert table_pin("CB503E1DD978") == "cb503e1dd978"
    with pytest.raises(ValueError, match="--slide scores the --eval sets"):
        get_task("seg").options.model_validate({"path": "x", "slide": True})

    views = drawn_views("a.png", 5, 4, 4, 4, seed=0)  # 2 x 1 boxes x 2 mirrors = 4 distinct views
    assert len(set(views)) == 4
    with pytest.raises(VermouthError, match="only 4 distinct 4x4 views"):
        drawn_views("a.png", 5, 4, 4, 5, seed=0)
    bad = Sample("x.png#1.0", tmp_path / "x.png", None, None, view=View((0, 0, 8, 8), geometry="squash"),
                 region=json.dumps([[0, 0, 1, 1]]))
    with pytest.raises(VermouthError, match="sample x.png#1.0: its object's segmentation .* not COCO polygons"):
        view_region(bad, 8)

    table = write_table(tmp_path / "t.safetensors", np.ones((2, 4), np.float32), ["a", "b"], {})
    before = _by_content({"context_table": str(table)})
    write_table(tmp_path / "t.safetensors", np.zeros((2, 4), np.float32), ["a", "b"], {})  # edited in place
    assert _by_content({"context_table": str(table)}) != before  # a sweep's finished points are redone
