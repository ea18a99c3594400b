"""A sweep with VPD's axes: method (vpd against vermouth on the same depth views, the same head) and
VPD's attention selector, on synthetic NYU-layout data and tiny models; one extraction per
(split, method), the context table read only by the method that conditions on it."""

from __future__ import annotations

import csv

from vermouth_cache.data.depth import scene_classes
from vermouth_cache.data.synthetic_dense import make_depth
from vermouth_cache.extract.context_tables import make_table
from vermouth_cache.store.entries import Store
from vermouth_cache.sweep import SweepOptions, load_recipe, run_sweep
from vermouth_cache.sweep.plan import extraction_requests, ResolvedModels


def test_method_is_a_sweep_axis(tiny, tmp_path):
    data = make_depth(tmp_path / "nyu", n_train=4, n_test=2, size=(64, 96))
    table = make_table(tmp_path / "scenes.safetensors", str(tiny["sd"]), list(scene_classes(data)), ["a {}"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: vpd_axes
task: depth
datasets:
  nyu: {{path: "{data}", views: 1}}
models: tiny
extract: {{shard_size: 8, context_table: "{table}"}}
train: {{resolution: 64, epochs: 2, batch_size: 4, head_width: 0.125}}
variants:
  - {{method: vpd, t: 1, noise: none, prompt: table-class, attn_maps: none}}
  - {{method: vpd, t: 1, noise: none, prompt: table-class, attn_maps: a32}}
  - {{method: vermouth, t: 10, noise: ddpm, prompt: "null", stages: "mid,up", attn_maps: none}}
""")
    r = load_recipe(recipe)
    reqs = extraction_requests(r.points, ResolvedModels.of(r.models, tmp_path / "m"), r.extract, str(tmp_path / "s"),
                               "cpu", False)
    by_method = {(q.method, q.split): q for q in reqs}
    assert len(reqs) == 4  # train and test, for each method: the two VPD points share one extraction
    assert by_method[("vpd", "train")].attn_maps == "a32"  # the widest selector of its points
    assert by_method[("vermouth", "train")].context_table is None and by_method[("vpd", "test")].context_table

    result = run_sweep(r, SweepOptions(out=str(tmp_path / "out"), device="cpu", progress=False))
    assert all(rec["status"] == "done" for rec in result.records), result.records
    rows = list(csv.DictReader(open(result.report["csv"])))
    assert {row["method"] for row in rows} == {"vpd", "vermouth"} and len(rows) == 3
    assert all(float(row["rmse"]) > 0 for row in rows)  # the main metric of each point
    store = Store(str(tmp_path / "out" / "store"))
    assert {e.manifest["about"]["method"] for e in store.entries("features")} == {"vpd", "vermouth"}
