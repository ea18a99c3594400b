"""TaskSettings is one frozen, checked declaration: Table 7 per task as the paper gives it, config.json
unchanged, and every bad value a one-line VermouthError (train/settings.py, train/config.py)."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.train.config import Declared, check_keys
from vermouth_cache.train.tasks import task_settings

# A run's config.json records these, key for key and in this order.
FIELDS = ["resolution", "t", "stages", "noise", "attn_maps", "prompt", "text_layer", "expert", "text_proj",
          "temperature", "templates", "head", "lr", "lr_schedule", "gamma", "power", "weight_decay", "grad_clip",
          "batch_size", "epochs", "iters", "eval_every", "seed", "tune_norms"]
COMMON = {"prompt": "blip", "text_layer": "final", "expert": "resnet18", "templates": None, "head": "uhead",
          "gamma": 0.9, "power": 0.9, "weight_decay": 5e-4, "grad_clip": 1.0, "seed": 0, "tune_norms": False}
TABLE7 = {
    "fewshot": dict(resolution=256, t=200, stages="down,mid", noise="ddpm", attn_maps="up", text_proj=False,
                    temperature=0.2, lr=1e-5, lr_schedule="none", batch_size=64, epochs=100, iters=None, eval_every=1),
    "sbir": dict(resolution=256, t=200, stages="mid,up", noise="ddim-inversion", attn_maps=None, text_proj=True,
                 temperature=0.02, lr=1e-4, lr_schedule="exponential", batch_size=64, epochs=1, iters=None,
                 eval_every=1),
    "seg": dict(resolution=512, t=10, stages="mid,up", noise="ddpm", attn_maps="up", text_proj=False,
                temperature=0.07, lr=5e-4, lr_schedule="polynomial", batch_size=16, epochs=None, iters=120_000,
                eval_every=10_000),
}


@pytest.mark.parametrize("task", sorted(TABLE7))
def test_table7_as_the_paper_gives_it_and_config_json_unchanged(task):
    s = task_settings(task)
    assert list(s.to_json()) == FIELDS
    assert s.to_json() == {**COMMON, **TABLE7[task]}
    fast = {"fewshot": {"epochs": 10}, "sbir": {}, "seg": {"iters": 8000, "eval_every": 2000}}[task]
    assert task_settings(task, "fast").to_json() == {**COMMON, **TABLE7[task], **fast}


def test_settings_are_frozen_hashable_and_travel_to_workers():
    s = task_settings("fewshot", lr=1e-3)
    with pytest.raises(ValidationError):
        s.lr = 1.0
    assert s == task_settings("fewshot", lr=1e-3) and len({s, task_settings("fewshot", lr=1e-3)}) == 1
    assert pickle.loads(pickle.dumps(s)) == s
    assert s.with_(lr=None, seed=2).to_json() == {**s.to_json(), "seed": 2}  # None keeps the value


def test_none_is_written_none():
    s = task_settings("fewshot", expert="none", attn_maps="none")
    assert s.expert is None and s.attn_maps is None


@pytest.mark.parametrize("overrides, message", [
    ({"lr": -1}, "lr, batch size and temperature must be positive"),
    ({"head": "lineer"}, "unknown head 'lineer' (choose from uhead, baseline, linear)"),
    ({"noise": "loud"}, "unknown noise 'loud' (choose from ddpm, ddim-inversion, none)"),
    ({"prompt": "caption-please"}, "unknown prompt mode 'caption-please' (choose from blip, null, random, "
                                   "classname, table, table-class, sentence, text:...)"),
    ({"t": 1000}, "timestep 1000 is outside 0-999"),
    ({"resolution": 100}, "resolution 100 must be a multiple of 64"),
    ({"stages": "mid,sideways"}, "unknown stage 'sideways' (choose from down, mid, up)"),
    ({"iters": 5}, "give exactly one of epochs and iterations"),
    ({"epochs": 0}, "epochs / iterations must be at least 1"),
    ({"batch_size": "many"}, "batch_size: input should be a valid integer, unable to parse string as an integer, "
                             "got 'many'"),
    ({"epochz": 3}, "settings: unknown key(s) epochz (allowed: method, resolution, t, "),
])
def test_a_bad_value_is_one_line_naming_it(overrides, message):
    with pytest.raises(VermouthError) as exc:
        task_settings("fewshot", **overrides)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


def test_a_declaration_refuses_unknown_keys_by_name():
    class Tiny(Declared):
        size: int = 1

    with pytest.raises(VermouthError, match=r"^r\.yaml: unknown key\(s\) sise \(allowed: size\)$"):
        Tiny.parse({"sise": 2}, where="r.yaml")
    with pytest.raises(VermouthError, match=r"^r\.yaml: --size: input should be a valid integer"):
        Tiny.parse({"size": "two"}, where="r.yaml", name_of=lambda key: f"--{key}")
    check_keys({"size": 1}, ("size",))


def test_another_method_takes_what_its_extraction_makes_by_default():
    """`train seg --method vpd` reads what `extract --method vpd` wrote, and `train depth --method
    vermouth` what `extract` wrote, without restating t, noise, prompt, taps and maps; options given
    still win."""
    from vermouth_cache.train.tasks import task_settings

    vpd = task_settings("seg", method="vpd")
    assert (vpd.t, vpd.noise, vpd.prompt, vpd.stages, vpd.attn_maps, vpd.expert) == (1, "none", "table", None, "a32", None)
    assert vpd.lr == task_settings("seg").lr  # the task's optimisation stays
    vermouth = task_settings("depth", method="vermouth", t=50)
    assert (vermouth.t, vermouth.noise, vermouth.prompt, vermouth.stages) == (50, "ddpm", "blip", "mid,up")
    assert task_settings("depth", method="vpd") == task_settings("depth")
