"""Optional dependencies: without the extra that brings one, the code that needs it says in one line
which extra to install (or, for a figure that is a by-product, skips it with a warning saying so).

A missing module is simulated with `sys.modules[name] = None`, which makes its import fail.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.errors import EXTRAS, MissingExtra, available, install_hint, require
from vermouth_cache.extract.cluster import client_for
from vermouth_cache.store.entries import Store
from vermouth_cache.sweep.report import write_plots
from vermouth_cache.train.heads import HeadSpec, VermouthHead
from vermouth_cache.train.loop import History
from vermouth_cache.train.runs import write_run

REPO = Path(__file__).resolve().parents[2]


def missing(monkeypatch, module: str) -> None:
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_every_extra_named_in_the_code_is_declared_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, extra in EXTRAS.items():  # the extra installs the module the code asks for
        assert any(req.replace("dask[distributed]", "distributed").startswith(module) for req in declared[extra])
    (own,) = [r for r in declared["test"] if r.startswith("vermouth-cache[")]
    assert set(own[len("vermouth-cache["):-1].split(",")) == set(EXTRAS.values())  # the tests need every extra


def test_require_names_the_extra(monkeypatch):
    missing(monkeypatch, "matplotlib")
    assert not available("matplotlib")
    with pytest.raises(MissingExtra) as exc:
        require("matplotlib", "drawing")
    assert one_line(exc) == "drawing needs matplotlib, which is not installed: pip install 'vermouth-cache[plots]'"
    assert isinstance(exc.value, VermouthError)


def test_an_s3_store_without_s3fs_says_which_extra(monkeypatch):
    missing(monkeypatch, "s3fs")
    with pytest.raises(MissingExtra) as exc:
        Store("s3://vc-bucket/cache", create=True)
    text = one_line(exc)
    assert "s3://vc-bucket/cache" in text and install_hint("s3fs") in text and "[s3]" in text


def test_workers_without_dask_distributed_say_which_extra(monkeypatch):
    missing(monkeypatch, "distributed")
    with pytest.raises(MissingExtra) as exc:
        client_for(2, None)
    assert "pip install 'vermouth-cache[dist]'" in one_line(exc)


def test_without_matplotlib_a_run_is_written_without_its_curve(monkeypatch, tmp_path, caplog):
    missing(monkeypatch, "matplotlib")
    spec = HeadSpec("linear", "global", "mid", {"mid_block": (8, 2, 2)}, {})
    (tmp_path / "curve.png").write_bytes(b"an older run's curve")
    with caplog.at_level(logging.WARNING, logger="vermouth_cache"):
        write_run(tmp_path, config={"out_dim": 3}, metrics={"top1": 0.5}, model=VermouthHead(spec, 3),
                  history=History([1], [0.5]), select=None)
    assert (tmp_path / "head.safetensors").is_file() and not (tmp_path / "curve.png").exists()
    assert "pip install 'vermouth-cache[plots]'" in caplog.text


def test_without_matplotlib_a_sweep_report_has_its_tables_and_no_plots(monkeypatch, tmp_path, caplog):
    missing(monkeypatch, "matplotlib")
    with caplog.at_level(logging.WARNING, logger="vermouth_cache"):
        assert write_plots([{"varied": {"t": 100}}], tmp_path / "plots") == []
    assert "pip install 'vermouth-cache[plots]'" in caplog.text
