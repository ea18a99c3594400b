"""Bundled vocabularies: counts, uniqueness, unseen-in-classes, templates, and the error paths."""

from __future__ import annotations

import json

import pytest

from vermouth_cache.data import vocab
from vermouth_cache.data.bundled import data_dir
from vermouth_cache.core.errors import VermouthError

COUNTS = {
    "ImageNet": 1000, "Caltech101": 100, "OxfordPets": 37, "StanfordCars": 196, "Flowers102": 102,
    "Food101": 101, "FGVCAircraft": 100, "SUN397": 397, "DTD": 47, "EuroSAT": 10, "UCF101": 101,
    "coco_stuff171": 171, "ade150": 150, "ade847": 847, "voc20": 20, "pc59": 59, "pc459": 459,
    "sketchy": 125, "tuberlin": 250, "quickdraw": 110,
}
UNSEEN = {"sketchy": ("sketchy", 25), "sketchy21": ("sketchy", 21), "tuberlin": ("tuberlin", 30),
          "quickdraw": ("quickdraw", 30)}
COOP = ["ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "Food101",
        "FGVCAircraft", "SUN397", "DTD", "EuroSAT", "UCF101"]


def test_every_list_is_known_and_nothing_else():
    assert vocab.known_classnames() == sorted(COUNTS)


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_counts_and_uniqueness(name):
    names = vocab.classnames(name)
    assert len(names) == COUNTS[name]
    assert all(n == n.strip() and n for n in names)
    dupes = {n for n in names if names.count(n) > 1}
    # CLIP's ImageNet names (copied by CoOp) give two synsets each of these names; kept verbatim.
    assert dupes == ({"missile", "sunglasses"} if name == "ImageNet" else set())


def test_label_order_spot_checks():
    # A wrong order is silent everywhere else, so pin a few labels from each family.
    assert vocab.classnames("ImageNet")[0] == "tench"
    assert vocab.classnames("imagenet")[999] == "toilet paper"
    assert vocab.classnames("Caltech101")[:4] == ("face", "leopard", "motorbike", "accordion")
    assert vocab.classnames("Food101")[16:18] == ("cheese_plate", "cheesecake")  # Python sort order
    assert vocab.classnames("EuroSAT")[0] == "Annual Crop Land"
    assert vocab.classnames("ade150")[:3] == ("wall", "building", "sky")
    assert vocab.classnames("coco_stuff171")[80] == "banner"
    assert "hot-air_balloon" in vocab.classnames("sketchy")
    for name in ("sketchy", "tuberlin", "quickdraw"):
        assert list(vocab.classnames(name)) == sorted(vocab.classnames(name))


@pytest.mark.parametrize("split", sorted(UNSEEN))
def test_unseen_are_classes(split):
    dataset, count = UNSEEN[split]
    unseen = vocab.unseen_classes(split)
    assert len(unseen) == len(set(unseen)) == count
    assert set(unseen) <= set(vocab.classnames(dataset))


def test_templates():
    raw = json.loads((data_dir() / "templates.json").read_text())
    assert set(COOP) | {"default", "imagenet_ensemble", "sbir", "segmentation"} <= set(raw)
    for key, items in raw.items():
        assert items and all("{}" in t for t in items), key
    assert len(vocab.templates("imagenet_ensemble")) == 80
    assert vocab.templates("OxfordPets") == ("a photo of a {}, a type of pet.",)
    assert vocab.templates("oxfordpets") == vocab.templates("OxfordPets")
    assert vocab.templates(None) == vocab.templates("no-such-set") == ("a photo of a {}.",)


def test_prompt_text():
    filled = vocab.prompt_text("a photo of a {}.", "hot-air_balloon")
    assert filled == "a photo of a hot-air balloon."
    assert vocab.prompt_text("{} texture.", "polka-dotted") == "polka-dotted texture."
    with pytest.raises(VermouthError, match="no {}"):
        vocab.prompt_text("a photo.", "cat")


def test_unknown_names_list_the_known_ones():
    with pytest.raises(VermouthError, match=r"class list 'imagenet21k'.*ImageNet.*voc20"):
        vocab.classnames("imagenet21k")
    with pytest.raises(VermouthError, match=r"unseen split 'coco'.*sketchy21.*tuberlin"):
        vocab.unseen_classes("coco")


def test_read_name_list(tmp_path):
    good = tmp_path / "mine.txt"
    good.write_text("# my classes\n  red fox \n\nhot-air_balloon\n#skipped\n")
    assert vocab.read_name_list(good) == ("red fox", "hot-air_balloon")

    dup = tmp_path / "dup.txt"
    dup.write_text("cat\ndog\n cat\n")
    with pytest.raises(VermouthError, match=r"dup\.txt: duplicate name 'cat'"):
        vocab.read_name_list(dup)

    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(VermouthError, match="no names"):
        vocab.read_name_list(empty)
    with pytest.raises(VermouthError, match="cannot read"):
        vocab.read_name_list(tmp_path / "missing.txt")
