"""The wide shapes world (48 categories) and the held-out-word splits of both worlds: the
renderer, the splits' promise (the head never meets the held-out word), and the data sets that
train the world's models."""

from __future__ import annotations

import colorsys
import hashlib

import numpy as np
import pytest
import torch

from datamodules.world_scenes import RenderedScenes
from grounded_diffusion.data.cache import TripletCache, pack_masks
from grounded_diffusion.data.segmentation_sets import RenderedShapes
from grounded_diffusion.data.vocabulary import CategorySplit
from grounded_diffusion.shapes_world.diagnostics import nearest_centroid_accuracy, object_features, text_space
from grounded_diffusion.shapes_world.render import (
    COLOURS,
    SHAPES_WIDE,
    SHAPES_WORLD,
    WIDE_COLOURS,
    WIDE_SHAPES,
    render_shapes_scene,
)


def test_the_20_category_world_renders_what_its_shipped_models_trained_on():
    # Digest of scenes 0-49 (seed 0) as rendered when the shipped weights were trained: the wide
    # world's colours and shapes are added beside the old ones without moving a pixel.
    digest = hashlib.sha256()
    for index in range(50):
        image, labels, names = render_shapes_scene(index)
        digest.update(image.tobytes() + labels.tobytes() + " ".join(names).encode())
    assert digest.hexdigest() == "db7c2ff8a664fbd243754cbd6bd56e477b13baab9aa6a86e47c39e8b4dcb86fb"


def test_wide_scenes_are_deterministic_and_labelled_in_the_wide_vocabulary():
    assert len(SHAPES_WIDE) == len(WIDE_COLOURS) * len(WIDE_SHAPES) == 48
    assert set(SHAPES_WORLD) < set(SHAPES_WIDE)
    found = set()
    for index in range(200):
        image, labels, names = render_shapes_scene(index, world="shapes_wide")
        again = render_shapes_scene(index, world="shapes_wide")
        assert np.array_equal(image, again[0]) and np.array_equal(labels, again[1]) and names == again[2]
        assert {SHAPES_WIDE[v - 1] for v in np.unique(labels) if v} == set(names)
        for name in names:  # each object is drawn in its colour word's hue (within the jitter)
            rgb = image[labels == SHAPES_WIDE.index(name) + 1].astype(float).mean(0) / 255
            hue = colorsys.rgb_to_hsv(*rgb)[0]
            target = WIDE_COLOURS[name.split()[0]]
            assert min(abs(hue - target), 1 - abs(hue - target)) < 0.04, (name, hue)
        found.update(names)
    assert len(found) > 40  # 200 scenes draw nearly every category


@pytest.mark.parametrize("world", ["shapes", "shapes_wide"])
def test_a_held_out_word_occurs_in_no_seen_category(world):
    for word in ("green", "cross"):
        split = CategorySplit.named(world, f"word_{word}")
        assert split.unseen and all(word in name.split() for name in split.unseen)
        assert not any(word in name.split() for name in split.seen)
        # every other word is still seen: only the held-out one is new to the head
        words = {w for name in split.categories for w in name.split()} - {word}
        assert words <= {w for name in split.seen for w in name.split()}


def test_every_wide_colour_has_seen_neighbours_on_both_sides_of_the_hue_circle():
    # What the held-out colour word needs to be learnable from the seen ones (and what the
    # 20-category world lacks: three colours 0.16-0.46 apart, one held out).
    hues = sorted(WIDE_COLOURS.values())
    gaps = np.diff(hues + [hues[0] + 1])
    assert max(gaps) <= 0.17 and len(hues) == 8
    assert max(np.diff(sorted(COLOURS.values()) + [1.0])) > 0.35


def test_the_world_models_training_sets_follow_their_world():
    scenes = RenderedScenes(8, world="shapes_wide")
    shapes = RenderedShapes(8, seed=1, world="shapes_wide")
    assert shapes.classes == list(SHAPES_WIDE) and RenderedShapes(2).classes == list(SHAPES_WORLD)
    for index in range(8):
        sample = scenes[index]
        names = render_shapes_scene(index, world="shapes_wide")[2]
        assert sample["caption"].startswith("a photograph of a " + names[0])
        image, labels = shapes[index]
        assert shapes.labels_present(index) == {int(v) for v in labels.unique() if v}


def test_text_space_measures_what_the_seen_embeddings_leave_unconstrained():
    # Hand-computed: seen offsets ±x, ±y around a shared component (5, 5, 5); the unseen offset
    # (3, 0, 4) has 4 of its 5 units along z, outside their span, and leans towards +x (cos 0.6).
    shared = torch.tensor([5.0, 5.0, 5.0])
    offsets = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [3, 0, 4]])
    split = CategorySplit(("a", "b", "c", "d", "u"), unseen=("u",))
    (row,) = text_space(offsets + shared, split)
    assert row["category"] == "u" and row["nearest"] == "a"
    assert row["outside"] == pytest.approx(0.8) and row["cosine"] == pytest.approx(0.6)


def test_nearest_centroid_accuracy_leaves_each_vector_out_of_its_own_centroid():
    # Hand-computed in 1-D (standardising keeps the order): a = {0, 1}, b = {2, 10}. Left out,
    # 2's own centroid is 10 (distance 8) and a's is 0.5 (1.5): 2 goes to a. With it, 10's own
    # centroid is 2 (8 away) and a's 0.5 (9.5): 10 stays in b; 0 and 1 stay in a.
    vectors = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    correct = nearest_centroid_accuracy(vectors, ["a", "a", "b", "b"])
    assert correct.tolist() == [True, True, False, True]


def test_object_features_average_every_group_over_each_object_found(tmp_path):
    # One test sample, two objects on a 4x4 mask grid: a fine group (2x2) and a coarse one (1x1,
    # spread over the fine grid). The left object covers the left half; the right one was not
    # found by the oracle (an empty mask) and is left out; a training sample is not read.
    cache = TripletCache(tmp_path)
    cache.initialise({"storage": "features", "feature_groups": [1, 1]})
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :, :2] = True
    bits, shape = pack_masks(masks)
    fine = torch.tensor([[[1.0, 3.0], [5.0, 7.0]]])  # [C=1, 2, 2]
    tensors = {"features.0": torch.tensor([[[10.0]]]), "features.1": fine, "masks": bits}
    record = {"prompt": "", "categories": ["green circle", "red ring"], "group": "two_unseen"}
    cache.write({"id": "test-two_unseen-000000", "split": "test", **record}, tensors, {"mask_shape": shape})
    cache.write({"id": "train-one_seen-000000", "split": "train", **record}, tensors, {"mask_shape": shape})
    vectors, names = object_features(tmp_path)
    assert names == ["green circle"]
    assert vectors.tolist() == [[10.0, 3.0]]  # coarse: 10 everywhere; fine: mean of 1 and 5
