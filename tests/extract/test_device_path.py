"""The extractor's GPU-path parts, checked on the CPU: chunk writes in a background thread, upstream
arrays kept where they were computed, compiled U-net layers, SDPA attention. None may change a byte."""

from __future__ import annotations

import threading

import pytest

from conftest import cli, record_content, store_bytes
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.extract import shards
from vermouth_cache.extract.context_tables import make_table
from vermouth_cache.extract.run import extract


@pytest.fixture
def broken_folder(folder):
    """The 5-image folder plus one file that is not an image (skipped with --on-error skip)."""
    (folder / "dog" / "zz.png").write_bytes(b"not a png")
    return folder


def test_background_writes_and_kept_latents_store_the_serial_paths_bytes(request_for, broken_folder, tmp_path,
                                                                         monkeypatch):
    """Chunks are written in the writer thread while the next step computes, and the U-net takes the
    latents and conditions this shard computed without reading them back; the bytes and records are
    those of in-place writes and read-back inputs, failed samples included."""
    from vermouth_cache.store.entry import Entry

    kw = dict(t=(100,), stages="mid", attn_maps="mid", prompt="blip", on_error="skip")
    writers = set()
    real_write = Entry.write_shard
    monkeypatch.setattr(Entry, "write_shard", lambda self, *a, **k: writers.add(threading.current_thread().name)
                        or real_write(self, *a, **k))
    extract(request_for(broken_folder, store=str(tmp_path / "a"), **kw))
    assert writers == {"vermouth-cache-write_0"}  # every chunk and record came from the writer thread

    monkeypatch.setattr(shards, "BACKGROUND_WRITES", False)
    real_upstream = shards._Steps.upstream

    def read_back(self, entry, name):  # forget what the shard computed: read it from the store
        self.carried.pop(name, None)
        return real_upstream(self, entry, name)

    monkeypatch.setattr(shards._Steps, "upstream", read_back)
    writers.clear()
    extract(request_for(broken_folder, store=str(tmp_path / "b"), **kw))
    assert writers == {threading.current_thread().name}
    assert store_bytes(tmp_path / "a") == store_bytes(tmp_path / "b")
    assert record_content(tmp_path / "a") == record_content(tmp_path / "b")
    statuses = [s for (_, _, status, *_) in record_content(tmp_path / "a").values() for s in status]
    assert any(s.startswith("error:") for s in statuses)  # the broken file is recorded, not written as numbers


def test_a_failed_background_write_stops_the_run_and_a_rerun_completes_it(request_for, folder, tmp_path,
                                                                          monkeypatch):
    """A write that fails in the writer thread surfaces in the extractor as the write's own error;
    the queued writes still run (their shards are whole), and a rerun gives the uninterrupted bytes."""
    from vermouth_cache.store.entry import Entry

    req = request_for(folder, t=(200,), stages="mid", prompt="null")
    extract(req.with_(store=str(tmp_path / "ref")))
    real_write = Entry.write_shard

    def fail_once(self, name, shard, *a, **k):
        if name == "mid_block" and shard == 1:
            raise VermouthError(f"simulated failure writing {name} shard {shard}")
        return real_write(self, name, shard, *a, **k)

    monkeypatch.setattr(Entry, "write_shard", fail_once)
    with pytest.raises(VermouthError, match="simulated failure writing mid_block shard 1"):
        extract(req)
    monkeypatch.undo()
    extract(req)
    assert store_bytes(tmp_path / "store") == store_bytes(tmp_path / "ref")
    assert record_content(tmp_path / "store") == record_content(tmp_path / "ref")


@pytest.mark.parametrize("method", ["vermouth", "vpd"])
def test_compiled_layers_store_the_same_bytes(request_for, folder, tmp_path, monkeypatch, method, tiny):
    """--compile goes through torch.compile on every ResNet block, sampler and (without attention
    maps) transformer, hooks and early stop untouched; with the eager backend (the same kernels) the
    store is byte-identical. Vermouth taps blocks and records attention; VPD taps layers inside blocks."""
    import torch

    from vermouth_cache.models import compiled

    monkeypatch.setattr(compiled, "BACKEND", "eager")
    if method == "vermouth":
        kw = dict(t=(200,), stages="mid,up", attn_maps="up", prompt="null")
    else:  # its taps are layers inside blocks: hooks on compiled transformers
        table = make_table(tmp_path / "classes.safetensors", str(tiny["sd"]), ["cat", "dog"], ["a photo of a {}."])
        kw = dict(method="vpd", prompt="table", context_table=str(table), attn_maps="none", resolution=128)
    counted = []
    real = compiled.compile_layers
    monkeypatch.setattr(compiled, "compile_layers", lambda unet, **k: counted.append(k) or real(unet, **k))
    torch._dynamo.reset()
    extract(request_for(folder, store=str(tmp_path / "compiled"), compile=True, **kw))
    extract(request_for(folder, store=str(tmp_path / "eager"), **kw))
    assert counted == [{"eager_transformers": method == "vermouth"}]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # dynamo did trace the layers
    assert store_bytes(tmp_path / "compiled") == store_bytes(tmp_path / "eager")
    assert record_content(tmp_path / "compiled") == record_content(tmp_path / "eager")


@pytest.mark.parametrize("option, message", [
    (["--compile"], "--compile is for CUDA: compiled CPU kernels round differently from eager ones, and a store's "
                    "bytes must not depend on how they were computed"),
    (["--precision", "fp16"], "--precision fp16 is for CUDA: the CPU computes in fp32, and a store's bytes must not "
                              "depend on how they were computed"),
])
def test_gpu_only_options_on_the_cpu_are_refused_in_one_line(request_for, folder, tmp_path, monkeypatch, capsys,
                                                             option, message):
    """Features computed another way share the key (how is not what): on the CPU, where stores are
    bit-identical, whatever changes the bytes without changing the key is refused."""
    req = request_for(folder)
    code, _, err = cli(monkeypatch, capsys, "extract", folder, "--store", tmp_path / "s", "--sd-model", req.sd_model,
                       "--captioner", req.captioner, "--device", "cpu", *option, "--quiet")
    assert code == 1 and err.strip() == f"error: {message}"
    assert not (tmp_path / "s").exists()


def test_attention_runs_through_pytorch_sdpa(tiny):
    """Every attention layer of the loaded U-net uses torch's scaled_dot_product_attention (flash or
    memory-efficient kernels on CUDA)."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from vermouth_cache.models.loading import Placement
    from vermouth_cache.models.pipeline import StableDiffusion

    sd = StableDiffusion(str(tiny["sd"]), Placement(torch.device("cpu"), torch.float32))
    procs = sd.unet.attn_processors
    assert procs and all(isinstance(p, AttnProcessor2_0) for p in procs.values())
