"""Context tables and the pickles VPD ships: read without running a line of the pickle's code.

A hostile .pth or refs(unc).p whose pickle calls os.system must be refused naming the global,
and nothing may run; a real `torch.save` table converts bit-exactly; a table's identity is the
sha256 of its bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.pickles import load_plain_pickle, load_torch_tensors
from vermouth_cache.data.tables import convert_pth, read_table, write_table


class Boom:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_plain_pickles_load_data_and_refuse_every_global(tmp_path):
    refs = [{"ref_id": 1, "sentences": [{"sent": "the man on the left", "tokens": ["the", "man"]}], "split": "val",
             "bbox": (1.0, 2.5, 3, 4)}]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    assert load_plain_pickle(tmp_path / "refs(unc).p") == refs
    marker = tmp_path / "ran"
    (tmp_path / "evil.p").write_bytes(pickle.dumps([Boom(marker)]))
    with pytest.raises(VermouthError, match=r"evil.p: refuses the pickled global posix.system"):
        load_plain_pickle(tmp_path / "evil.p")
    assert not marker.exists()
    (tmp_path / "cut.p").write_bytes(pickle.dumps(refs)[:20])
    with pytest.raises(VermouthError, match="cut.p: not a readable pickle"):
        load_plain_pickle(tmp_path / "cut.p")


@pytest.mark.parametrize("obj", ["tensor", "dict", "view"])
def test_torch_save_files_convert_bit_exactly_without_unpickling(tmp_path, obj):
    x = torch.randn(6, 5)
    saved = {"tensor": x, "dict": {"class_embeddings": x}, "view": x.t().contiguous().t()[:, :]}[obj]
    torch.save(saved, tmp_path / "t.pth")
    got = load_torch_tensors(tmp_path / "t.pth")
    got = got["class_embeddings"] if obj == "dict" else got
    np.testing.assert_array_equal(got, x.numpy())
    out = convert_pth(tmp_path / "t.pth", tmp_path / "t.safetensors", rows=[f"c{i}" for i in range(6)])
    table = read_table(out)
    np.testing.assert_array_equal(table.values, x.numpy())
    assert table.rows == tuple(f"c{i}" for i in range(6))
    assert table.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert table.about["pth_sha256"] == hashlib.sha256((tmp_path / "t.pth").read_bytes()).hexdigest()


def test_a_pth_whose_pickle_calls_code_is_refused_and_nothing_runs(tmp_path):
    torch.save(torch.zeros(2, 3), tmp_path / "ok.pth")
    with zipfile.ZipFile(tmp_path / "ok.pth") as z:
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
    marker = tmp_path / "ran"
    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as z:
        z.writestr(pkl, pickle.dumps(Boom(marker), protocol=2))
    with pytest.raises(VermouthError, match="refuses the pickled global"):
        load_torch_tensors(tmp_path / "evil.pth")
    assert not marker.exists()
    (tmp_path / "legacy.pth").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(VermouthError, match="not a torch zip file"):
        load_torch_tensors(tmp_path / "legacy.pth")


def test_tables_refuse_what_cannot_condition_a_unet(tmp_path):
    with pytest.raises(VermouthError, match="one row per name"):
        write_table(tmp_path / "t.safetensors", np.zeros((2, 4)), ["a"], {})
    with pytest.raises(VermouthError, match="unique"):
        write_table(tmp_path / "t.safetensors", np.zeros((2, 4)), ["a", "a"], {})
    with pytest.raises(VermouthError, match="finite"):
        write_table(tmp_path / "t.safetensors", np.full((1, 4), np.nan), ["a"], {})
    with pytest.raises(VermouthError, match="does not exist"):
        read_table(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"not json")
    with pytest.raises(VermouthError, match="not a readable safetensors table"):
        read_table(tmp_path / "junk.safetensors")
    path = write_table(tmp_path / "t.safetensors", np.ones((2, 4)), ["a", "b"], {"x": 1})
    table = read_table(path)
    with pytest.raises(VermouthError, match="has no row 'c'"):
        table.row("c")
    buf = io.BytesIO(path.read_bytes())
    assert table.sha256 == hashlib.sha256(buf.getvalue()).hexdigest()


def test_tables_with_bad_shapes_or_metadata_are_refused_on_read(tmp_path):
    import json as _json

    from safetensors.numpy import save

    with pytest.raises(VermouthError, match="one row per name"):
        write_table(tmp_path / "w0.safetensors", np.zeros((2, 0)), ["a", "b"], {})
    cases = {
        "empty": ({"context": np.zeros((0, 4), np.float32)}, {"rows": "[]", "about": "{}"}),
        "ints": ({"context": np.zeros((1, 4), np.int32)}, {"rows": '["a"]', "about": "{}"}),
        "rows_int": ({"context": np.zeros((1, 4), np.float32)}, {"rows": "3", "about": "{}"}),
        "rows_dup": ({"context": np.zeros((2, 4), np.float32)}, {"rows": '["a", "a"]', "about": "{}"}),
        "about_list": ({"context": np.zeros((1, 4), np.float32)}, {"rows": '["a"]', "about": "[1]"}),
    }
    for name, (arrays, meta) in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(save(arrays, metadata=meta))
        with pytest.raises(VermouthError, match=f"context table .*{name}"):
            read_table(tmp_path / f"{name}.safetensors")
    assert _json  # the metadata above is JSON text, as safetensors stores it
