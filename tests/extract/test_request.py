"""ExtractRequest is one declaration: frozen and validated in one line per bad value, and the
`extract` command's options (names, types, choices, defaults, help) are read from it."""

from __future__ import annotations

import click
import pytest

from vermouth_cache.cli.main import main
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.seg import LAYOUTS
from vermouth_cache.extract.request import Choices, ExtractRequest, option_name
from vermouth_cache.methods import METHODS
from vermouth_cache.models.noise import NOISE_MODES


def req(**kw) -> ExtractRequest:
    return ExtractRequest(dataset="imgs", store="cache", **kw)


def test_defaults_normalisation_and_frozen():
    r = req()
    assert r.t == (200,) and r.stages == "mid,up" and r.method == "vermouth" and r.noise == "ddpm"
    assert r.block_taps == ("mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3")
    assert req(t=(400, 100, 400)).t == (100, 400) and req(t=7).t == (7,) and req(t="300,20").t == (20, 300)
    assert req(taps="up_blocks.1").stages is None  # taps alone: no default stages
    with pytest.raises(Exception):
        r.t = (5,)


def test_with_validates_again_and_json_round_trips(tmp_path):
    r = req(t=(100, 200), prompt="text:a cat", attn_maps="up")
    with pytest.raises(VermouthError, match="timestep 1000 is outside 0-999"):
        r.with_(t=(1000,))
    assert r.with_(seed=3).seed == 3 and r.with_(seed=3).t == r.t
    again = ExtractRequest.from_json(r.to_json(), store="elsewhere")
    assert again.with_(store="cache", dataset=r.dataset).to_json() == r.to_json()
    assert r.to_json()["method"] == "vermouth" and "store" not in r.to_json()


@pytest.mark.parametrize("kw,message", [
    ({"shots": "three"}, "--shots: Input should be a valid integer"),
    ({"no_such_field": 1}, "ExtractRequest has no field 'no_such_field'"),
    ({"layout": "pc459"}, "unknown layout 'pc459' (choose from"),
    ({"precision": "fp8"}, "unknown precision 'fp8' (choose from auto, fp32, fp16, bf16)"),
    ({"workers": 0}, "--workers must be at least 1"),
    ({"max_error_rate": 2.0}, "--max-error-rate 2.0 must lie in 0-1"),
    ({"caption_min_tokens": 9, "caption_max_tokens": 3}, "caption token limits need 0 <= min <= max"),
    ({"expert_model": "x"}, "--expert-model needs --expert"),
    ({"workers": 2, "scheduler": "tcp://h:1"}, "not both"),
])
def test_bad_values_are_one_line(kw, message):
    with pytest.raises(VermouthError) as exc:
        req(**kw)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_extract_options_are_read_from_the_declaration():
    params = {p.name: p for p in main.commands["extract"].params}
    for name, field in ExtractRequest.model_fields.items():
        if name == "progress":
            assert params["quiet"].is_flag  # progress is the command's --quiet
            continue
        p = params[name]
        if name == "dataset":
            assert isinstance(p, click.Argument)
            continue
        assert p.opts == [option_name(name)] and p.help == field.description
        choices = next((m for m in field.metadata if isinstance(m, Choices)), None)
        if choices is not None:
            assert list(p.type.choices) == list(choices.values()), name
        if not field.is_required() and field.default not in (None, ""):
            shown = ",".join(map(str, field.default)) if isinstance(field.default, tuple) else field.default
            assert p.default == shown, name
    assert list(params["layout"].type.choices) == list(LAYOUTS) and "pc459" not in list(LAYOUTS)
    assert list(params["noise"].type.choices) == list(NOISE_MODES)
    assert list(params["method"].type.choices) == list(METHODS)
    assert params["store"].required


def test_cli_passes_only_what_was_typed(monkeypatch, capsys, tmp_path):
    """Options left out fall to the request's defaults, so a method's fixed fields are never
    contradicted by a default the command line did not ask for."""
    from conftest import cli

    seen = {}

    def fake_extract(r):
        seen["req"] = r
        raise VermouthError("stop here")

    monkeypatch.setattr("vermouth_cache.extract.run.extract", fake_extract)
    code, _, err = cli(monkeypatch, capsys, "extract", tmp_path, "--store", tmp_path / "s", "--t", "5,3", "--quiet")
    assert code == 1 and "stop here" in err
    r = seen["req"]
    assert r.t == (3, 5) and not r.progress
    assert not {"noise", "seed", "resolution", "method"} & r.model_fields_set  # defaults: the request's own
