"""Vocabulary parsing and checks, the built-in ODISE vocabularies, seen flags, demo composition."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

import promptseg
from promptseg import Vocabulary
from promptseg.vocabularies import DEMO_PRESETS, PRESETS, read_preset, seen_flags

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
LABELS = resources.files("promptseg.vocabularies") / "labels"

# name: (classes, things, COCO-seen classes (spec §12.11), lines in the label file)
PRESET_FACTS = {
    "coco_panoptic": (133, 80, 133, 201),
    "ade20k_150": (150, 100, 64, 151),
    "ade20k_847": (847, 0, 101, 848),
    "pascal_context_59": (59, 0, 51, 60),
    "pascal_context_459": (459, 0, 85, 460),
    "pascal_voc_21": (21, 0, 21, 21),
    "lvis_1203": (1203, 1203, 80, 1203),
}
# upstream NVlabs/ODISE @ 2b187e4, odise/data/datasets/openseg_labels/<name>_with_prompt_eng.txt
SHA256 = {
    "coco_panoptic": "26b556596bb4f59a6f7a77633589f4152a76537d56d040afd9960e29fed9350f",
    "ade20k_150": "388e2a8aabc1cc485cc5c6de544a5dc7d5f1f7ae982ed6cf35688a7b118acf90",
    "ade20k_847": "792f7fa7233bd0fdf921be8e596cf46b8b7d22ce2265f532bf2a50a0b11767ff",
    "pascal_context_59": "14cbfcfc457c27c196397db4b0534b8df11ea54bcfa057f0676ea645713a63dc",
    "pascal_context_459": "d3ef82d5d1b78fd7f312eacfaa47302c83d863ed27b16358139ff3fb179dd78f",
    "pascal_voc_21": "b27d7fd1c2c59616e726db49b34471db54825d3ff84c110a181a4976abd126eb",
    "lvis_1203": "fded859c3cc683d399195f948273a2ce104b8980ecb1bfb97da405cfd233e103",
}


def test_preset_names():
    assert PRESETS == tuple(PRESET_FACTS)
    assert set(DEMO_PRESETS) <= set(PRESETS)
    with pytest.raises(ValueError, match="unknown vocabulary preset 'ade150'.*ade20k_150"):
        Vocabulary.preset("ade150")
    with pytest.raises(ValueError, match="choose one of coco_panoptic"):
        Vocabulary.preset(["coco_panoptic"])


@pytest.mark.parametrize("name", PRESETS)
def test_preset_counts_and_files(name):
    n_classes, n_things, n_seen, n_lines = PRESET_FACTS[name]
    data = (LABELS / f"{name}_with_prompt_eng.txt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHA256[name]  # verbatim upstream copy
    assert len(data.decode().splitlines()) == n_lines
    vocab = Vocabulary.preset(name)
    assert len(vocab) == len(vocab.is_thing) == n_classes
    assert sum(vocab.is_thing) == n_things
    assert sum(seen_flags(vocab)) == n_seen
    # the file's synonyms, unchanged and in file order (unused ids skipped)
    lines = [line.split(":", 1)[1] for line in data.decode().splitlines()]
    assert [",".join(c) for c in vocab.classes] == [s for s in lines if s != "invalid_class_id"]
    assert Vocabulary.preset(name) == vocab and hash(Vocabulary.preset(name)) == hash(vocab)


def test_preset_contents():
    names = ("coco_panoptic", "ade20k_150", "pascal_voc_21", "lvis_1203")
    coco, ade, voc, lvis = (Vocabulary.preset(n) for n in names)
    assert coco.names[:3] == ["person", "bicycle", "car"] and coco.names[80] == "banner"
    assert coco.classes[0][:3] == ("person", "child", "girl")
    assert ade.names[:3] == ["wall", "building", "sky"] and ade.names[-1] == "flag"
    assert voc.names[0] == "background" and len(voc.classes[0]) == 74  # long, with repeats
    assert voc.classes[0].count("bag") == 2
    assert lvis.classes[0] == ("aerosol can", "spray can") and lvis.names[-1] == "zucchini"
    # ADE20K-847 has distinct classes with one display name (different synonyms): allowed
    a847 = Vocabulary.preset("ade20k_847")
    bags = [c for c in a847.classes if c[0] == "bag"]
    assert len(bags) == 3 and len({frozenset(c) for c in bags}) == 3


def test_thing_flags_match_dataset_metadata():
    coco = Vocabulary.preset("coco_panoptic")
    assert coco.is_thing == (True,) * 80 + (False,) * 53
    categories_file = SHARED_DATA / "panopticapi-sample" / "panoptic_coco_categories.json"
    if categories_file.is_file():  # panopticapi's own category list, beside the checkout
        categories = json.loads(categories_file.read_text())
        assert coco.is_thing == tuple(bool(c["isthing"]) for c in categories)
    ade = Vocabulary.preset("ade20k_150")
    flags = dict(zip(ade.names, ade.is_thing, strict=True))
    # Mask2Former ADE20K_150_CATEGORIES ids 0..21: isthing of wall ... water
    assert ade.is_thing[:22] == tuple(bool(int(c)) for c in "0000000110101011001110")
    assert flags["person"] and flags["car"] and not flags["sky"] and not flags["road"]
    for name in ("ade20k_847", "pascal_context_59", "pascal_context_459", "pascal_voc_21"):
        assert not any(Vocabulary.preset(name).is_thing)
    assert all(Vocabulary.preset("lvis_1203").is_thing)
    ids = json.loads((LABELS / "thing_ids.json").read_text())
    assert list(ids) == list(PRESETS)


def test_seen_flags():
    vocab = Vocabulary("black pickup truck,pickup truck;truck;blue sky,sky;Truck")
    assert seen_flags(vocab) == (False, True, True, False)  # verbatim string match only
    assert seen_flags(vocab, reference=Vocabulary("pickup truck")) == (True, False, False, False)
    assert seen_flags(vocab, reference="lvis_1203")[:2] == (True, True)
    assert all(seen_flags(Vocabulary.preset("coco_panoptic")))
    with pytest.raises(ValueError, match="unknown vocabulary preset"):
        seen_flags(vocab, reference="coco")


def test_parsing():
    vocab = Vocabulary("cat,kitty;dog")
    assert vocab.classes == (("cat", "kitty"), ("dog",)) and vocab.names == ["cat", "dog"]
    assert vocab.is_thing == (True, True)
    assert Vocabulary("  cat , kitty ;dog\n") == vocab
    assert Vocabulary([["cat", "kitty"], "dog"]) == vocab
    assert Vocabulary((("cat", "kitty"), ("dog",))) == vocab
    assert Vocabulary(["cat,kitty"]).classes == (("cat,kitty",),)  # list items are not split
    flags = Vocabulary("a;b;c", is_thing=[True, np.bool_(False), 1]).is_thing
    assert flags == (True, False, True) and all(type(f) is bool for f in flags)
    assert Vocabulary("a;b", is_thing=(f for f in (False, True))).is_thing == (False, True)
    # shared synonyms and repeated synonyms are allowed
    assert len(Vocabulary("cat,kitty;kitten,kitty;dog,dog")) == 3


@pytest.mark.parametrize(
    "classes, is_thing, error, match",
    [
        ("", None, ValueError, "has no class"),
        ("  ", None, ValueError, "has no class"),
        ("cat;", None, ValueError, "class 1 is empty.*drop the extra ';'"),
        ("cat;;dog", None, ValueError, "class 1 is empty"),
        ([], None, ValueError, "has no class"),
        ([[]], None, ValueError, "class 0 is empty"),
        (["cat", "  "], None, ValueError, "class 1 is empty"),
        ("cat,,kitty", None, ValueError, r"class 0 \('cat'\) has an empty synonym at position 1"),
        ([["", "cat"]], None, ValueError, r"class 0 \('cat'\) has an empty synonym at position 0"),
        ("cat;dog;cat", None, ValueError, r"classes 0 \('cat'\) and 2 \('cat'\) have the same"),
        ("cat,kitty;kitty,cat", None, ValueError, r"classes 0 \('cat'\) and 1 \('kitty'\)"),
        (3, None, TypeError, "must be a str or a list, got int"),
        (b"cat", None, TypeError, "got bytes"),
        ({"cat"}, None, TypeError, "got set"),
        (["cat", 3], None, TypeError, "class 1 is a int"),
        ([["cat", None]], None, TypeError, r"class 0, synonym 1 is a NoneType \(None\)"),
        ([b"cat"], None, TypeError, "class 0 is a bytes"),
        ("cat;dog", [True], ValueError, "is_thing has 1 flags for 2 classes"),
        ("cat;dog", [True, True, False], ValueError, "3 flags for 2 classes"),
        ("cat;dog", "yes", TypeError, "is_thing must be a list of bools"),
        ("cat;dog", 1, TypeError, "got int"),
        ("cat;dog", [True, "no"], TypeError, r"is_thing\[1\] is 'no'"),
        ("cat;dog", [True, 2], TypeError, r"is_thing\[1\] is 2"),
        ("cat;dog", [True, 0.5], TypeError, r"is_thing\[1\] is 0.5"),
    ],
)
def test_bad_input(classes, is_thing, error, match):
    with pytest.raises(error, match=match):
        Vocabulary(classes, is_thing)


def test_duplicates_allowed_on_request():
    vocab = Vocabulary("cat;dog;cat", allow_duplicates=True)
    assert vocab.names == ["cat", "dog", "cat"]
    assert len(Vocabulary("bag,purse;bag,suitcase")) == 2  # same display name, other synonyms


@pytest.mark.parametrize("name", PRESETS)
def test_round_trip(name):
    vocab = Vocabulary.preset(name)
    again = Vocabulary(vocab.classes, vocab.is_thing)
    assert again == vocab and hash(again) == hash(vocab)
    assert pickle.loads(pickle.dumps(vocab)) == vocab
    assert dataclasses.replace(vocab, is_thing=[False] * len(vocab)).classes == vocab.classes
    text = ";".join(",".join(c) for c in vocab.classes)
    assert Vocabulary(text, vocab.is_thing) == vocab
    with pytest.raises(dataclasses.FrozenInstanceError):
        vocab.classes = ()
    assert {vocab: 1}[again] == 1


def test_large_vocabulary_is_cheap():
    classes, things = read_preset("lvis_1203")
    start = time.perf_counter()
    for _ in range(10):
        Vocabulary(classes, things)
    per_build = (time.perf_counter() - start) / 10
    assert per_build < 0.05, f"building 1203 classes took {per_build * 1e3:.1f} ms"
    assert repr(Vocabulary.preset("lvis_1203")) == (
        "Vocabulary(1203 classes, 1203 things: 'aerosol can', 'air conditioner', 'airplane', "
        "'alarm clock', 'alcohol', 'alligator', ...)"
    )


def test_with_presets_follows_the_demo_order():
    coco, ade, lvis = (Vocabulary.preset(n) for n in DEMO_PRESETS)

    def split(vocab: Vocabulary, want: bool) -> list[tuple[str, ...]]:
        return [c for c, t in zip(vocab.classes, vocab.is_thing, strict=True) if t is want]

    user = "black pickup truck,pickup truck;blue sky,sky"
    demo = Vocabulary.with_presets(user)
    expected = [
        ("black pickup truck", "pickup truck"),
        ("blue sky", "sky"),
        *split(coco, True),
        *split(ade, True),
        *lvis.classes,
        *split(coco, False),
        *split(ade, False),
    ]
    assert list(demo.classes) == expected and len(demo) == 2 + 133 + 150 + 1203
    assert demo.is_thing == (True,) * (2 + 80 + 100 + 1203) + (False,) * (53 + 50)
    assert len(demo.classes) - len({frozenset(c) for c in demo.classes}) == 42  # repeats kept
    assert demo.names.count("person") == 3
    assert seen_flags(demo)[:2] == (False, True)

    assert Vocabulary.with_presets() == Vocabulary.with_presets(None, DEMO_PRESETS)
    assert len(Vocabulary.with_presets()) == 133 + 150 + 1203
    assert Vocabulary.with_presets(user, presets=()) == Vocabulary(user)
    assert Vocabulary.with_presets("cat", "pascal_voc_21").names[:2] == ["cat", "background"]
    mixed = Vocabulary.with_presets(Vocabulary("grass;dog", [False, True]), ["coco_panoptic"])
    assert mixed.names[:2] == ["dog", "person"] and mixed.names[81] == "grass"


def test_with_presets_errors():
    with pytest.raises(ValueError, match="no user classes and no presets"):
        Vocabulary.with_presets(None, ())
    with pytest.raises(ValueError, match=r"presets repeats \['coco_panoptic'\]"):
        Vocabulary.with_presets("cat", ["coco_panoptic", "ade20k_150", "coco_panoptic"])
    with pytest.raises(ValueError, match="unknown vocabulary preset 'COCO'"):
        Vocabulary.with_presets("cat", ["COCO"])
    with pytest.raises(ValueError, match="same synonyms"):
        Vocabulary.with_presets("cat;cat")


def test_prompt_api():
    vocab = Vocabulary.preset("pascal_voc_21")
    assert promptseg.as_prompt(vocab) == [vocab]
    assert promptseg.prompts.prompt_kind(vocab) == "open_vocab"
