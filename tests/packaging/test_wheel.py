"""The package installs from a built wheel, and with a plain `pip install .`, and then runs without
the checkout: the bundled data and pipelines ship inside it and are found through importlib.resources.

Offline and quick: the wheel is built without build isolation (setuptools comes with the `test`
extra) from a copy of what a build needs, installed with `--no-deps` into a fresh venv made
without pip, and the dependencies are lent from this environment through a `.pth` file naming its
site-packages. A `.pth` line adds a directory to sys.path without running the `.pth` files in it,
so the editable install of the checkout (`__editable__*.pth`) stays behind: the venv imports the
wheel's copy, and the test checks that it does.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NEEDED = ("pyproject.toml", "README.md", "LICENSE", "vermouth_cache", "data", "pipelines")  # what a build reads
NOT_SHIPPED = ("make_demo.py",)  # repository tools under data/


def _run(args, *, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, args))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _source_copy(dest: Path) -> Path:
    """What a build needs, copied (links kept as links: vermouth_cache/bundled_* point at data/ and
    pipelines/): an in-tree build writes build/ and *.egg-info, which must not land in the checkout."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in NEEDED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def _venv(path: Path) -> Path:
    """A venv without pip that sees this environment's packages but not the checkout."""
    _run([sys.executable, "-m", "venv", "--without-pip", path], cwd=path.parent)
    python = path / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=path).stdout.strip())
    lent = [p for p in dict.fromkeys([*site.getsitepackages(), sysconfig.get_path("purelib")]) if Path(p).is_dir()]
    (purelib / "lent-dependencies.pth").write_text("".join(f"{p}\n" for p in lent))
    return python


def _install(python: Path, target) -> None:
    # pip of this environment, run for the venv's interpreter (--python): the venv needs no pip.
    # --ignore-installed: the checkout's own install, visible through the lent site-packages, is
    # neither counted as installed nor ever uninstalled.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
          "--no-build-isolation", "--ignore-installed", target], cwd=python.parent, timeout=600)


def _where(python: Path, cwd: Path) -> dict[str, Path]:
    code = ("import vermouth_cache\nfrom vermouth_cache.data.bundled import bundled_file, pipeline_file\n"
            "print(vermouth_cache.__file__)\nprint(bundled_file('words.txt'))\nprint(pipeline_file('demo.yaml'))\n")
    lines = _run([python, "-c", code], cwd=cwd).stdout.split()
    return dict(zip(("package", "words", "pipeline"), map(Path, lines)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = _source_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, src], cwd=src,
         timeout=600)
    (whl,) = out.glob("vermouth_cache-*.whl")
    return whl


def test_the_wheel_holds_every_bundled_file_and_nothing_else(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"vermouth_cache/bundled_data/{p.relative_to(REPO / 'data').as_posix()}"
               for p in (REPO / "data").rglob("*") if p.is_file() and p.name not in NOT_SHIPPED
               and "__pycache__" not in p.parts}
    shipped |= {f"vermouth_cache/bundled_pipelines/{p.name}" for p in (REPO / "pipelines").glob("*.yaml")}
    assert "vermouth_cache/bundled_data/words.txt" in shipped and not shipped - names, sorted(shipped - names)
    modules = {f"vermouth_cache/{p.relative_to(REPO / 'vermouth_cache').as_posix()}"
               for p in (REPO / "vermouth_cache").rglob("*.py") if "bundled_" not in p.parts[-2]}
    assert not modules - names, sorted(modules - names)
    odd = [n for n in names if "__pycache__" in n or n.endswith(".pyc") or any(n.endswith(x) for x in NOT_SHIPPED)
           or not (n.startswith("vermouth_cache/") or n.startswith("vermouth_cache-"))]
    assert not odd, odd
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "License-Expression: MIT" in text and "Provides-Extra: s3" in text and "Provides-Extra: plots" in text


def test_the_demo_runs_from_an_installed_wheel_in_another_directory(wheel, tmp_path):
    python = _venv(tmp_path / "venv")
    _install(python, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _where(python, elsewhere)
    site_dir = tmp_path / "venv"
    assert all(p.is_relative_to(site_dir) for p in where.values()), where  # the wheel's copy, not the checkout
    out = _run([site_dir / "bin" / "vermouth-cache", "demo", "--out", elsewhere / "demo", "--quiet"], cwd=elsewhere,
               timeout=900)
    assert "few-shot U-head trained from the cache" in out.stdout
    assert (elsewhere / "demo" / "run" / "head.safetensors").is_file()


def test_a_plain_pip_install_of_the_source_finds_its_data(tmp_path):
    src = _source_copy(tmp_path / "src")
    python = _venv(tmp_path / "venv")
    _install(python, src)  # `pip install .`: built and installed as a wheel, not linked to the source
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _where(python, elsewhere)
    assert all(p.is_relative_to(tmp_path / "venv") for p in where.values()), where
    shutil.rmtree(src)  # nothing may still point into it
    assert _where(python, elsewhere) == where
    help_text = _run([tmp_path / "venv" / "bin" / "vermouth-cache", "--help"], cwd=elsewhere).stdout
    assert "demo" in help_text and "extract" in help_text
