"""`vermouth-cache tables make | convert | show` and the VPD tasks' commands, as a user types them."""

from __future__ import annotations

import torch

from conftest import cli
from test_hostile_inputs import one_line
from vermouth_cache.data.tables import read_table


def test_tables_make_convert_show(monkeypatch, capsys, tiny, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("kitchen\nstudy room\n")
    code, out, err = cli(monkeypatch, capsys, "tables", "make", tmp_path / "t.safetensors", "--classes", names,
                         "--template", "a photo of a {}.", "--template", "a {} here", "--clip", tiny["sd"])
    assert code == 0, err
    t = read_table(tmp_path / "t.safetensors")
    assert t.rows == ("kitchen", "study room") and t.sha256 in out and t.about["templates"] == ["a photo of a {}.",
                                                                                                "a {} here"]
    torch.save(torch.arange(6, dtype=torch.float32).view(2, 3), tmp_path / "e.pth")
    code, out, err = cli(monkeypatch, capsys, "tables", "convert", tmp_path / "e.pth", tmp_path / "e.safetensors",
                         "--classes", names)
    assert code == 0 and "2 rows x 3" in out, err
    code, out, _ = cli(monkeypatch, capsys, "tables", "show", tmp_path / "e.safetensors")
    assert "kitchen, study room" in out
    code, _, err = cli(monkeypatch, capsys, "tables", "make", tmp_path / "x.safetensors", "--classes", names,
                       "--templates", "nosuch", "--clip", tiny["sd"])
    one_line(code, err, "unknown template set 'nosuch'")
    code, _, err = cli(monkeypatch, capsys, "tables", "convert", names, tmp_path / "y.safetensors")
    one_line(code, err, "not a torch zip file")


def test_vpd_tasks_have_commands_with_their_options(monkeypatch, capsys):
    for task, options in (("depth", ("--views", "--view-seed", "--head-width", "--method")),
                          ("refer", ("--eval-split", "--image-root", "--head-width"))):
        code, out, _ = cli(monkeypatch, capsys, "train", task, "--help")
        assert code == 0 and all(o in out for o in options), (task, out)
    code, out, _ = cli(monkeypatch, capsys, "extract", "--help")
    for o in ("--context-table", "--text-tokens", "--views", "vpd"):
        assert o in out
