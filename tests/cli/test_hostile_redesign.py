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
