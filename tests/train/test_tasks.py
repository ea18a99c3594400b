"""The task registry is the one place that lists tasks: `vermouth-cache train`, its options, and a
sweep's recipe checks, extraction plan, training and scores read it. A throwaway task declared in
this module and registered here shows up in all of them with no other file edited."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
from click.testing import CliRunner
from pydantic import Field

from conftest import DEMO_SPLIT, cli
from vermouth_cache.cli.main import main
from vermouth_cache.cli.train import flag, offered_settings
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.extract.selection import PINS
from vermouth_cache.sweep.plan import ResolvedModels, extraction_requests
from vermouth_cache.sweep.recipe import load_recipe
from vermouth_cache.train.common import RunOptions
from vermouth_cache.train.settings import TaskSettings
from vermouth_cache.train.tasks import TASKS, get_task, register, task_settings
from vermouth_cache.train.tasks.base import DataOptions, Task, metric_keys


# ---- a throwaway task: linear colour classification on a CoOp split, trained by a stand-in ----

class ColourOptions(DataOptions):
    path: str = Field(description="CoOp split file whose images are sorted by colour.")
    colour_space: Literal["rgb", "hsv"] = Field("rgb", description="Colour space the probe reads.")

    def data(self) -> dict:
        return {"split": self.path, "space": self.colour_space}

    def extract_parts(self) -> list[dict]:
        return [{"dataset": self.path, "split": "train"}, {"dataset": self.path, "split": "test"}]


TRAINED: list = []


def train_colour_heads(data, jobs, opts) -> list[dict]:
    TRAINED.append((data, [j.settings for j in jobs]))
    return [{"task": "colour", "accuracy": 0.5 + 0.1 * i, "steps": j.settings.epochs} for i, j in enumerate(jobs)]


COLOUR = Task(name="colour", description="Colour classification with a linear probe (a test's task).",
              options=ColourOptions, table7=get_task("fewshot").table7.with_(head="linear", lr=1e-3, epochs=3),
              fast={"epochs": 1}, prepare=lambda data, s, opts: None, train_heads=train_colour_heads,
              main_metric="accuracy", summary=metric_keys("accuracy", "steps"))


@pytest.fixture
def colour(monkeypatch):
    monkeypatch.setitem(TASKS, "colour", COLOUR)  # removed again after the test
    TRAINED.clear()
    return COLOUR


# ---- the registry ------------------------------------------------------------------------------

def test_the_registry_lists_exactly_the_five_tasks():
    assert list(TASKS) == ["depth", "fewshot", "refer", "sbir", "seg"]
    assert all(TASKS[name].name == name for name in TASKS)
    assert {t.main_metric for t in TASKS.values()} == {"rmse", "top1", "oIoU", "mAP@all", "mIoU"}
    with pytest.raises(VermouthError, match=r"^unknown task 'colour' \(choose from depth, fewshot, refer, sbir, seg\)$"):
        get_task("colour")
    with pytest.raises(VermouthError, match="registered twice"):
        register(TASKS["seg"])


def test_task_settings_are_each_tasks_table7_then_fast_then_overrides():
    for task in TASKS.values():
        assert task_settings(task.name) == task.table7
        assert task_settings(task.name, "fast") == task.table7.with_(**task.fast)
    assert task_settings("seg", "fast", lr=1e-3).to_json() == {**TASKS["seg"].table7.to_json(), "iters": 8000,
                                                               "eval_every": 2000, "lr": 1e-3}


def test_the_old_import_path_says_where_task_settings_went():
    with pytest.raises(ImportError, match="from vermouth_cache.train.tasks import task_settings"):
        exec("from vermouth_cache.train.settings import task_settings")


# ---- the command line is generated from the declarations ---------------------------------------

@pytest.mark.parametrize("name", ["fewshot", "sbir", "seg"])
def test_each_command_offers_its_data_options_every_setting_and_the_run_options(name):
    task = TASKS[name]
    command = main.commands["train"].get_command(None, name)
    opts = {o for p in command.params for o in p.opts}
    assert {flag(n) for n in task.options.model_fields} <= opts
    assert {flag(n) for n in offered_settings(task)} | {"--schedule", "--store", "--out", "--memory-gb"} <= opts
    assert {p.option for p in PINS} <= opts
    assert ("--tune-norms" in opts) == (name == "seg")  # a task-own setting: only seg trains the norms
    text = CliRunner().invoke(main, ["train", name, "--help"], terminal_width=200).output
    for n in offered_settings(task):  # every setting explained, with this task's Table 7 value
        assert TaskSettings.model_fields[n].description.split(" (")[0] in text
    assert f"Timestep of the cached features. [Table 7: {task.table7.t}]" in text


def test_help_reads_choices_from_the_declarations_never_retyped():
    from vermouth_cache.data.seg import LAYOUTS

    text = CliRunner().invoke(main, ["train", "seg", "--help"], terminal_width=200).output
    assert "[" + "|".join(LAYOUTS) + "]" in text and "pc459|" not in text
    assert "[Table 7: 120000; fast: 8000]" in text
    fewshot = CliRunner().invoke(main, ["train", "fewshot", "--help"], terminal_width=200).output
    assert "--shots [1|2|4|8|16]" in fewshot and "[default: 16]" in fewshot


def test_bad_setting_values_are_one_line(monkeypatch, capsys, tmp_path):
    base = ("train", "fewshot", "--store", tmp_path / "store", "--dataset", DEMO_SPLIT, "--out", tmp_path / "run")
    code, _, err = cli(monkeypatch, capsys, *base, "--lr", "-1")
    assert code == 1 and err == "error: lr, batch size and temperature must be positive\n"
    code, _, err = cli(monkeypatch, capsys, *base, "--prompt", "caption-please")
    assert code == 1 and err.count("\n") == 1 and "unknown prompt mode 'caption-please'" in err
    code, _, err = cli(monkeypatch, capsys, "train", "seg", *base[2:], "--eval", "a:b:c:d")
    assert code == 1 and err == "error: --eval: 'a:b:c:d': expected PATH[:LAYOUT[:SPLIT]]\n"
    code, _, err = cli(monkeypatch, capsys, "train", "seg", *base[2:], "--eval", "ade:ade20k,voc:pc459:val")
    assert code == 1 and err.startswith("error: unknown --eval (voc.layout) 'pc459' (choose from generic, ")


def test_a_registered_task_gets_its_command(colour, monkeypatch, capsys, tmp_path):
    listing = CliRunner().invoke(main, ["train", "--help"]).output
    assert "colour" in listing and "Colour classification" in listing
    text = CliRunner().invoke(main, ["train", "colour", "--help"], terminal_width=200).output
    assert "--colour-space [rgb|hsv]" in text and "[Table 7: linear]" in text and "--lr" in text
    code, out, err = cli(monkeypatch, capsys, "train", "colour", "--dataset", "split.json", "--colour-space", "hsv",
                         "--store", tmp_path / "store", "--out", tmp_path / "run", "--schedule", "fast", "--seed", "3")
    assert code == 0, err
    assert json.loads(out[:out.index("}") + 1]) == {"accuracy": 0.5, "steps": 1}
    (data, [s]), = TRAINED
    assert data == {"split": "split.json", "space": "hsv"} and s == COLOUR.table7.with_(epochs=1, seed=3)


# ---- a sweep reads the registry --------------------------------------------------------------------

def _recipe(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text("models: tiny\n" + body)
    return path


def test_a_registered_task_is_a_sweep_task(colour, tmp_path):
    from vermouth_cache.sweep.run import GroupJob, train_group

    recipe = load_recipe(_recipe(tmp_path, "task: colour\ndatasets:\n  c: {path: /d/split.json, colour_space: hsv}\n"
                                           "train: {colour: {lr: 0.01}}\ngrid: {seed: [0, 1]}\n"
                                           "paper: [{dataset: c, value: 61}]\n"))
    assert [p.name for p in recipe.points] == ["c-seed_0", "c-seed_1"]
    assert recipe.points[1].settings == COLOUR.table7.with_(lr=0.01, seed=1)
    reqs = extraction_requests(recipe.points, ResolvedModels.of(recipe.models, tmp_path), {}, str(tmp_path), None,
                               False)
    assert sorted((r.dataset, r.split) for r in reqs) == [("/d/split.json", "test"), ("/d/split.json", "train")]

    out = tmp_path / "runs" / "c-seed_0"
    base = {"point": "c-seed_0", "dataset": "c", "eval_labels": [], "paper_candidates": [{"dataset": "c",
            "metric": "accuracy", "value": 0.61}]}
    job = GroupJob("colour", recipe.points[0].dataset.data_options.data(), (("c-seed_0", recipe.points[0].settings,
                   str(out)),), RunOptions(store=str(tmp_path)), (base,), threads=0)
    rec, = train_group(job)
    assert rec["status"] == "done" and rec["scores"] == [{"dataset": "c", "metric": "accuracy", "value": 0.5}]
    assert rec["paper"] == base["paper_candidates"] and (out / "point.json").is_file()


def test_recipe_keys_of_a_dataset_come_from_its_task(colour, tmp_path):
    bad = _recipe(tmp_path, "datasets:\n  c: {task: colour, path: x, shots: 4}\n")
    with pytest.raises(VermouthError, match=r"datasets\.c: unknown key\(s\) shots \(allowed: task, path, colour_space\)"):
        load_recipe(bad)
    bad = _recipe(tmp_path, "datasets:\n  c: {task: colour, path: x, colour_space: cmyk}\n")
    with pytest.raises(VermouthError, match=r"datasets\.c: unknown colour_space 'cmyk' \(choose from rgb, hsv\)"):
        load_recipe(bad)
    bad = _recipe(tmp_path, "datasets:\n  c: {task: nosuchtask, path: x}\n")
    with pytest.raises(VermouthError, match=r"unknown task 'nosuchtask' \(choose from depth, fewshot, refer, sbir, seg, colour\)"):
        load_recipe(bad)
    bad = _recipe(tmp_path, "datasets:\n  p: {task: fewshot, path: x, shots: 3}\n")
    with pytest.raises(VermouthError, match=r"datasets\.p: unknown shots 3 \(choose from 1, 2, 4, 8, 16\)"):
        load_recipe(bad)


def test_seg_eval_sets_are_labelled_alike_from_a_recipe_list_and_the_command_line(tmp_path):
    seg = TASKS["seg"].options
    given = seg.parse({"path": "/d/coco", "eval": ["/d/ADE:ade20k:validation", "/d/ADE:ade20k:training",
                                                   {"name": "pc", "path": "/d/VOC2010", "layout": "pascal-context"}]})
    assert seg.parse({"path": "/d/coco", "eval": {
        "ADE": {"path": "/d/ADE", "layout": "ade20k", "split": "validation"},
        "ADE:training": {"path": "/d/ADE", "layout": "ade20k", "split": "training"},
        "pc": {"path": "/d/VOC2010", "layout": "pascal-context"}}}) == given
    assert [p["dataset"] for p in given.extract_parts()] == ["/d/coco", "/d/ADE", "/d/ADE", "/d/VOC2010"]
    with pytest.raises(VermouthError, match="two evaluation sets are named 'ADE:val'"):
        seg.parse({"path": "/d/coco", "eval": ["/d/ADE:ade20k:val", "/x/ADE:ade20k:val", "/y/ADE:ade20k:val"]})
    with pytest.raises(VermouthError, match=r"^unknown eval\.ADE\.layout 'pc459' \(choose from generic, ade847,"):
        seg.parse({"path": "/d/coco", "eval": ["/d/ADE:pc459:val"]})
