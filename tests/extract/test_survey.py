"""`survey` (the sweep's dry run) names the entries `extract` writes and sizes them exactly,
without writing a byte or running a model."""

from __future__ import annotations

import numpy as np

from vermouth_cache.extract.run import extract
from vermouth_cache.extract.survey import survey


def test_survey_before_and_after_extract(request_for, folder, tiny, tmp_path):
    req = request_for(folder, t=(10, 50), stages="mid,up", attn_maps="up", expert="resnet18",
                      expert_model=str(tiny["resnet18"]), dtype="fp32")
    before = survey(req)
    assert not (tmp_path / "store").exists()  # nothing written
    assert [e.kind for e in before] == ["captions", "text", "latents", "features", "features", "expert"]
    assert all(e.state == "missing" for e in before)

    report = extract(req)
    keys = {e.kind + (f" t={e.about['t']}" if e.kind == "features" else ""): e.key for e in before}
    assert keys == report.entries
    from vermouth_cache.store.entries import Store

    store = Store(req.store)
    for e in before:
        entry = store.find(e.kind, e.key)
        # uncompressed bytes of every array, from the shapes actually written (fp32: 4 bytes)
        written = sum(entry.n_samples * 4 * int(np.prod(spec["shape"])) for spec in entry.arrays.values())
        assert e.bytes_to_write == written, e.kind
    after = survey(req)
    assert [e.key for e in after] == [e.key for e in before]
    assert all(e.state == "present" and e.bytes_to_write == 0 for e in after)

    partial = survey(req.with_(t=(10, 300)))
    states = {(e.kind, e.about.get("t")): e.state for e in partial}
    assert states[("features", 10)] == "present" and states[("features", 300)] == "missing"
    assert states[("latents", None)] == "present"
