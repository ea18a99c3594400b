"""Old (0.1) module paths fail with one line naming the new one; every new one exists."""

import importlib
import subprocess
import sys

import pytest

from vermouth_cache.moved import MOVED


def test_an_old_module_path_names_its_new_home():
    with pytest.raises(ModuleNotFoundError, match=r"^vermouth_cache\.request moved to vermouth_cache\.extract\.request"):
        importlib.import_module("vermouth_cache.request")


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_new_home_exists_and_no_old_path_still_does(old):
    importlib.import_module(MOVED[old])
    with pytest.raises(ModuleNotFoundError, match="moved to"):
        importlib.import_module(old)


def test_an_unknown_module_is_still_the_plain_error():
    with pytest.raises(ModuleNotFoundError) as exc:
        importlib.import_module("vermouth_cache.no_such_module")
    assert "moved" not in str(exc.value)


def test_a_script_on_the_old_path_prints_where_to_go():
    proc = subprocess.run([sys.executable, "-c", "from vermouth_cache.tiny_models import write_tiny_models"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "vermouth_cache.tiny_models moved to vermouth_cache.models.tiny" in proc.stderr.splitlines()[-1]
