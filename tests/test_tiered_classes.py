"""tieredImageNet's published class list (Ren et al. 2018) and the loader's check of the files'
classes against it, on tiny fake files in Ren et al.'s format named by the real wnids."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from PIL import Image

from metarun.data.images import SPLITS
from metarun.data.tiered_classes import SPLIT_OF, SUPERCLASS_OF, TIERED_CLASSES, TIERED_SPLIT
from metarun.data.tieredimagenet import PUBLISHED, load_tieredimagenet, split_differences
from metarun.testing import write_tieredimagenet

SIDE = 4


def test_the_list_has_the_published_counts():
    assert [len(TIERED_CLASSES[s]) for s in SPLITS] == [351, 97, 160]
    assert [len(TIERED_SPLIT[s]) for s in SPLITS] == [20, 6, 8]
    for split in SPLITS:
        assert len(TIERED_CLASSES[split]) == PUBLISHED[split]["classes"]
        assert len(TIERED_SPLIT[split]) == PUBLISHED[split]["superclasses"]
        assert all(TIERED_SPLIT[split].values())  # no empty superclass


def test_no_class_or_superclass_is_in_two_splits_or_listed_twice():
    classes = [c for s in SPLITS for c in TIERED_CLASSES[s]]
    assert len(set(classes)) == len(classes) == 608 == len(SPLIT_OF)
    supers = [sup for s in SPLITS for sup in TIERED_SPLIT[s]]
    assert len(set(supers)) == len(supers) == 34
    assert not set(supers) & set(classes)
    for split in SPLITS:
        for sup, members in TIERED_SPLIT[split].items():
            assert {SPLIT_OF[c] for c in members} == {split}
            assert {SUPERCLASS_OF[c] for c in members} == {sup}


def test_every_id_is_a_wordnet_noun_id():
    wnid = re.compile(r"n\d{8}")
    ids = [*SPLIT_OF, *SUPERCLASS_OF.values()]
    bad = [i for i in ids if not wnid.fullmatch(i)]
    assert not bad
    # Spot checks against the source files' first and last lines.
    assert TIERED_SPLIT["train"]["n01524359"][0] == "n01530575"
    assert TIERED_CLASSES["val"][-1] == "n04467665" and SUPERCLASS_OF["n04467665"] == "n03791235"
    assert TIERED_CLASSES["test"][-1] == "n07768694" and SUPERCLASS_OF["n07768694"] == "n15046900"


def published_names() -> dict[str, list[str]]:
    return {s: list(TIERED_CLASSES[s]) for s in SPLITS}


def test_the_published_split_has_no_differences():
    assert split_differences(published_names()) == {}
    # The order of the classes in the files does not matter.
    assert split_differences({s: sorted(n) for s, n in published_names().items()}) == {}


def test_a_class_of_another_split_an_unknown_and_a_missing_one_are_named():
    names = published_names()
    moved = names["test"].pop(5)  # a published test class, in the train files
    names["train"].append(moved)
    dropped = names["val"].pop(0)
    names["val"].append("n99999999")
    differences = split_differences(names)
    assert set(differences) == {"train", "val", "test"}
    train = differences["train"]
    assert "train: 352 classes, the published split has 351" in train
    assert f"1 of them are published test classes ({moved})" in train
    assert "missing" not in train
    val = differences["val"]
    assert "val: 97 classes, the published split has 97" in val
    assert "1 are in no published split (n99999999)" in val
    assert f"1 published val classes are missing ({dropped})" in val
    assert f"1 published test classes are missing ({moved})" in differences["test"]


def test_many_offenders_are_shown_a_few_at_a_time():
    names = published_names()
    names["train"] = names["train"] + names["val"]
    names["val"] = []
    train = split_differences(names)["train"]
    assert "97 of them are published val classes (" in train
    assert ", ... 94 more)" in train
    assert len(train) < 300


def test_names_that_are_not_wnids_are_only_counted():
    words = {s: [f"class{i}" for i in range(len(TIERED_CLASSES[s]))] for s in SPLITS}
    assert split_differences(words) == {}
    words["val"].pop()
    differences = split_differences(words)
    assert list(differences) == ["val"]
    assert "val: 96 classes, the published split has 97" in differences["val"]
    assert "'class0'" in differences["val"] and "not WordNet ids" in differences["val"]


def write_pickles(root: Path, names: dict[str, list[str]]) -> None:
    """Ren et al.'s files with one tiny image per class, the classes named ``names``."""
    write_tieredimagenet(root, names=names, per_class=1, side=SIDE, pixels="marked")


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("metarun.data")
    ]


def test_the_loader_is_silent_on_files_of_the_published_split(tmp_path, caplog):
    write_pickles(tmp_path / "tiered", published_names())
    with caplog.at_level(logging.INFO):
        pools = load_tieredimagenet(tmp_path / "tiered", image_size=SIDE, cache_dir=str(tmp_path))
    assert [len(pools[s].names) for s in SPLITS] == [351, 97, 160]
    assert warnings_of(caplog) == []
    assert "train: 20 superclasses" in caplog.text


def test_the_loader_warns_when_the_files_follow_another_split(tmp_path, caplog):
    names = published_names()
    moved = names["val"].pop(3)
    names["train"].append(moved)
    write_pickles(tmp_path / "tiered", names)
    with caplog.at_level(logging.WARNING):
        load_tieredimagenet(tmp_path / "tiered", image_size=SIDE, cache_dir=str(tmp_path))
    warnings = warnings_of(caplog)
    assert len(warnings) == 2
    train, val = warnings
    assert str(tmp_path / "tiered") in train
    assert "train: 352 classes, the published split has 351" in train
    assert f"1 of them are published val classes ({moved})" in train
    assert "val: 96 classes, the published split has 97" in val
    assert f"1 published val classes are missing ({moved})" in val
    assert "Fix: use Ren et al.'s split" in val


def test_image_folders_named_by_wnid_are_checked_too(tmp_path, caplog):
    root = tmp_path / "tiered"
    chosen = {"train": TIERED_CLASSES["test"][:2], "val": ["n01440763"], "test": ["goldfish"]}
    for split, classes in chosen.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (SIDE, SIDE)).save(root / split / name / "0.png")
    with caplog.at_level(logging.WARNING):
        load_tieredimagenet(root, image_size=SIDE, cache_dir=str(tmp_path / "cache"))
    train, val, test = warnings_of(caplog)
    assert "2 of them are published test classes" in train and TIERED_CLASSES["test"][0] in train
    assert "1 are in no published split (n01440763)" in val
    assert "test: 1 classes, the published split has 160" in test and "'goldfish'" in test


def test_a_class_in_two_splits_is_still_an_error(tmp_path):
    names = published_names()
    names["val"].append(names["train"][0])
    write_pickles(tmp_path / "tiered", names)
    with pytest.raises(ValueError, match=f"class {names['train'][0]} is in both the train"):
        load_tieredimagenet(tmp_path / "tiered", image_size=SIDE, cache_dir=str(tmp_path))
