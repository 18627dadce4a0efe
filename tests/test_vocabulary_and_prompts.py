"""Vocabularies, splits and the prompt source of synthesis runs."""

import pytest

from grounded_diffusion.data.prompts import GROUPS, PromptSet, group_of
from grounded_diffusion.data.sources import select_items
from grounded_diffusion.data.vocabulary import (
    COCO,
    COCO_UNSEEN,
    PASCAL_VOC,
    SEEN_COUNTS,
    VOC_TO_COCO,
    CategorySplit,
    UnknownCategoryError,
)
from grounded_diffusion.errors import ConfigError

PASCAL1 = CategorySplit.named("pascal", 1)


def test_coco_has_80_classes_and_the_standard_zero_shot_split_1():
    assert len(COCO) == len(set(COCO)) == 80
    split = CategorySplit.named("coco", 1)
    assert len(split.seen) == 65 and len(split.unseen) == 15
    # The standard 65/15 split (docs/design.md §3), written out here independently.
    assert set(split.unseen) == {
        "airplane",
        "train",
        "parking meter",
        "cat",
        "bear",
        "suitcase",
        "frisbee",
        "snowboard",
        "fork",
        "sandwich",
        "hot dog",
        "toilet",
        "mouse",
        "toaster",
        "hair drier",
    }


def test_coco_rotations_are_fixed_disjoint_15_class_splits():
    unseen = [set(COCO_UNSEEN[k]) for k in (1, 2, 3)]
    assert all(len(u) == 15 for u in unseen)
    assert not (unseen[0] & unseen[1]) and not (unseen[0] & unseen[2]) and not (unseen[1] & unseen[2])


def test_seen_count_sets_have_the_paper_sizes_and_are_nested():
    seen = {n: set(CategorySplit.named("coco", f"seen{n}").seen) for n in SEEN_COUNTS}
    assert {n: len(s) for n, s in seen.items()} == {5: 5, 20: 20, 35: 35, 50: 50, 65: 65}
    for small, large in zip(SEEN_COUNTS, SEEN_COUNTS[1:]):
        assert seen[small] < seen[large]
    assert seen[65] == set(CategorySplit.named("coco", 1).seen)


def test_voc_names_map_onto_coco_names():
    assert all(VOC_TO_COCO.get(c, c) in COCO for c in PASCAL_VOC)


def test_unknown_split_and_category_name_the_valid_choices():
    with pytest.raises(ConfigError, match="'seen5'"):
        CategorySplit.named("coco", 7)
    with pytest.raises(UnknownCategoryError, match="did you mean 'hot dog'"):
        CategorySplit.named("coco", None, ["hotdog"])


def test_a_sample_depends_on_its_id_alone():
    prompts = PromptSet({"test": {g: 30 for g in GROUPS}})
    full = list(prompts.dataset(PASCAL1))
    by_id = {s["id"]: s for s in full}
    # A resumed run (some ids excluded) and a reversed reading give the same samples.
    done = {s["id"] for s in full[::3]}
    resumed = list(prompts.dataset(PASCAL1, exclude=done))
    assert len(resumed) == len(full) - len(done)
    assert all(by_id[s["id"]] == s for s in resumed)
    again = PromptSet({"test": {g: 30 for g in GROUPS}})
    assert [again.sample(s["id"], "test", s["group"], PASCAL1) for s in reversed(full)] == full[::-1]
    # ... and another seed gives other samples.
    other = list(PromptSet({"test": {g: 30 for g in GROUPS}}, seed=1).dataset(PASCAL1))
    assert [s["prompt"] for s in other] != [s["prompt"] for s in full]


def test_every_sample_belongs_to_its_group():
    samples = list(PromptSet({"test": {g: 40 for g in GROUPS}}).dataset(PASCAL1))
    assert len(samples) == 200
    for sample in samples:
        assert group_of(sample["categories"], PASCAL1.unseen) == sample["group"]
        assert len(set(sample["categories"])) == len(sample["categories"])
        assert all(f"a {c}" in sample["prompt"] for c in sample["categories"])
    # Both orders of a seen + unseen pair occur, and many categories are used.
    pairs = [s["categories"] for s in samples if s["group"] == "two_seen_unseen"]
    assert {c[0] in PASCAL1.unseen for c in pairs} == {True, False}
    assert len({c for s in samples for c in s["categories"]}) == 20


def test_training_prompts_use_seen_categories_only():
    with pytest.raises(ConfigError, match="training sets use seen categories only"):
        PromptSet({"train": {"one_seen": 5, "one_unseen": 5}})
    with pytest.raises(ConfigError, match="Unknown prompt groups"):
        PromptSet({"test": {"three_seen": 5}})


def test_templates_from_a_file_and_bad_templates(tmp_path):
    path = tmp_path / "complex.txt"
    path.write_text("a {c1} sleeping on the grass\n\na {c1} next to a {c2} at sunset\n")
    prompts = PromptSet({"test": {"one_seen": 3, "two_seen": 3}}, templates_file=str(path))
    prompts.prepare()
    prompts.check(PASCAL1)
    texts = [s["prompt"] for s in prompts.dataset(PASCAL1)]
    assert all(t.endswith("sleeping on the grass") for t in texts[:3])
    assert all(t.endswith("at sunset") for t in texts[3:])
    with pytest.raises(ConfigError, match=r"must contain \{c1\}"):
        PromptSet({"test": {"one_seen": 1}}, templates=["a photo of a {cat}"])
    with pytest.raises(ConfigError, match="No 2-object template"):
        PromptSet({"test": {"two_seen": 1}}, templates=["a {c1}"]).check(PASCAL1)


def test_groups_the_split_cannot_serve_fail_at_config_time():
    no_unseen = CategorySplit.named("pascal", None, [])
    with pytest.raises(ConfigError, match="two_unseen needs 0 seen and 2 unseen"):
        PromptSet({"test": {"two_unseen": 1}}).check(no_unseen)


def test_the_cap_per_group_keeps_the_same_ids_when_a_build_resumes():
    items = [(f"{g}-{i}", "test", g) for g in ("a", "b") for i in range(5)]
    assert [i[0] for i in select_items(items, set(), 2)] == ["a-0", "a-1", "b-0", "b-1"]
    assert [i[0] for i in select_items(items, {"a-0", "b-1"}, 2)] == ["a-1", "b-0"]
