"""Extraction inputs people already have: WebDataset tar shards and a saved Hugging Face dataset,
read in place, with the identity rule of every dataset (the sha256 of each image's bytes)."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest

from conftest import make_images
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.datasets import load_dataset
from vermouth_cache.extract.run import extract
from vermouth_cache.store.entries import Store


def write_shards(folder, out, per_shard=3):
    """folder/<class>/<i>.png as WebDataset shards: KEY.png + KEY.cls, and classes.txt."""
    out.mkdir()
    files = sorted(folder.rglob("*.png"))
    classes = sorted({p.parent.name for p in files})
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    for k in range(0, len(files), per_shard):
        with tarfile.open(out / f"{k // per_shard:06d}.tar", "w") as tar:
            for p in files[k:k + per_shard]:
                key = f"{p.parent.name}_{p.stem}"
                for ext, data in (("png", p.read_bytes()), ("cls", str(classes.index(p.parent.name)).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return out


def write_hf(folder, out, splits=False):
    import datasets

    files = sorted(folder.rglob("*.png"))
    classes = sorted({p.parent.name for p in files})
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in files],
                                     "label": [classes.index(p.parent.name) for p in files]}, features=feats)
    ds = ds.cast_column("image", datasets.Image())
    (datasets.DatasetDict({"train": ds}) if splits else ds).save_to_disk(str(out))
    return out


@pytest.fixture
def images(tmp_path):
    return make_images(tmp_path / "imgs", {"cat": 3, "dog": 2})


def test_tar_shards_and_hf_datasets_list_their_images_and_labels(images, tmp_path):
    folder = load_dataset(images)
    digests = sorted(hashlib.sha256(s.path.read_bytes()).hexdigest() for s in folder.samples)
    for ds in (load_dataset(write_shards(images, tmp_path / "wds")), load_dataset(write_hf(images, tmp_path / "hf"))):
        assert len(ds) == 5 and ds.classnames == ("cat", "dog")
        assert sorted(s.label for s in ds.samples) == sorted(s.label for s in folder.samples)
        from vermouth_cache.data.members import member_bytes

        assert sorted(hashlib.sha256(member_bytes(s.path, s.member)).hexdigest() for s in ds.samples) == digests
    with pytest.raises(VermouthError, match="give --split"):
        load_dataset(write_hf(images, tmp_path / "hfdict", splits=True))
    assert len(load_dataset(tmp_path / "hfdict", split="train")) == 5
    with pytest.raises(VermouthError, match="WebDataset shards have no splits"):
        load_dataset(tmp_path / "wds", split="train")


def test_archive_features_equal_the_folders_and_a_bad_member_is_skipped(images, request_for, tmp_path):
    shards = write_shards(images, tmp_path / "wds")
    hf = write_hf(images, tmp_path / "hf")
    reps = {name: extract(request_for(src, prompt="null", stages="mid", store=str(tmp_path / f"store-{name}")))
            for name, src in (("folder", images), ("wds", shards), ("hf", hf))}
    latent = {}
    for name, rep in reps.items():
        ds = load_dataset({"folder": images, "wds": shards, "hf": hf}[name])
        z = Store(str(tmp_path / f"store-{name}")).find("latents", rep.entries["latents"]).read("latent")
        by_bytes = {}
        for s, row in zip(ds.samples, z):
            from vermouth_cache.data.images import decode_sample  # the bytes each row was made from

            key = hashlib.sha256(np.asarray(decode_sample(s)).tobytes()).hexdigest()
            by_bytes[key] = row
        latent[name] = by_bytes
    assert latent["wds"].keys() == latent["folder"].keys() == latent["hf"].keys()
    for k in latent["folder"]:
        assert np.array_equal(latent["wds"][k], latent["folder"][k]) and np.array_equal(latent["hf"][k], latent["folder"][k])

    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(bad / "000000.tar", "w") as tar:
        for name, data in (("a.png", (images / "cat" / "00.png").read_bytes()), ("b.png", b"not an image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rep = extract(request_for(bad, prompt="null", stages="mid", store=str(tmp_path / "b"), on_error="skip"))
    assert list(rep.failed) == ["000000.tar/b.png"] and "not a decodable image" in rep.failed["000000.tar/b.png"]


def test_an_archive_rewritten_in_place_is_read_again_in_the_same_process(images, tmp_path):
    """The cached tar index and opened HF dataset are keyed by the files' state: a dataset saved
    over the old one (new bytes, same path) changes the identity without a new process."""
    import shutil

    hf = write_hf(images, tmp_path / "hf")
    before = load_dataset(hf).identity()
    (images / "cat" / "00.png").write_bytes((images / "dog" / "00.png").read_bytes())
    write_hf(images, tmp_path / "hf2")
    shutil.rmtree(hf)
    shutil.move(tmp_path / "hf2", hf)
    assert load_dataset(hf).identity() != before
    shards = write_shards(images, tmp_path / "wds")
    before = load_dataset(shards).identity()
    with tarfile.open(shards / "000000.tar", "a") as tar:  # one more image appended to a shard
        data = (images / "dog" / "01.png").read_bytes()
        info = tarfile.TarInfo("extra.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert len(load_dataset(shards)) == 6 and load_dataset(shards).identity() != before
