"""A triplet cache and the data it was built from: no silent wrong labels, no stale or half-built
cache that passes as whole.

- class lists and image sets read as a user saves them (a byte-order mark, another encoding, an
  empty list), or one line;
- every cached sample records a fingerprint of its source (its files' sizes, times and hash, or its
  prompt, categories and seed): ``predict`` rebuilds what changed, ``fit`` / ``test`` refuse it;
- ``predict`` records what it set out to build, and ``fit`` / ``test`` refuse an unfinished cache
  (or go on with a warning under ``allow_incomplete``);
- manifest lines that parse but hold wrong values are damaged lines: named by ``fit``, rebuilt
  by ``predict``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_errors import cli_error
from test_own_data import CLASSES, make_own_folder

from conftest import REPO, cache_of, small_scenes_args
from grounded_diffusion.cli import main
from grounded_diffusion.data.procedural_scenes import ProceduralScenes
from grounded_diffusion.data.prompts import PromptSet
from grounded_diffusion.data.voc import VOCFolder
from grounded_diffusion.data.vocabulary import read_classes_file
from grounded_diffusion.errors import ConfigError


def small(root: Path, *more: str) -> list[str]:
    return [*small_scenes_args(root), *more]


# -- class lists and image sets as users save them (no model) ---------------------------------------


def test_a_classes_file_with_a_byte_order_mark_keeps_every_label(tmp_path):
    folder = make_own_folder(tmp_path / "voc")
    (folder / "classes.txt").write_text("\ufeffbackground\n" + "\n".join(CLASSES) + "\n", encoding="utf-8")
    assert read_classes_file(folder / "classes.txt") == tuple(CLASSES)  # background skipped, not a class
    samples = VOCFolder(str(folder), image_size=64).dataset()
    # train2 holds label 3 (dog) and 2 (hot dog): with the mark kept, they were "hot dog" and "traffic light"
    assert samples[2]["categories"] == ["hot dog", "dog"]


def test_a_classes_file_in_another_encoding_is_one_line(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_bytes("background\ncafé\nthé\n".encode("latin-1"))
    with pytest.raises(ConfigError) as error:
        read_classes_file(path)
    assert str(error.value).startswith(f"Classes file '{path}' is not UTF-8 text (byte 14)")
    assert "\n" not in str(error.value)


def test_an_empty_image_set_is_refused_before_any_work(tmp_path):
    folder = make_own_folder(tmp_path / "voc")
    (folder / "ImageSets" / "Segmentation" / "train.txt").write_text("\n")
    with pytest.raises(ConfigError, match=r"train.txt' lists no image: write the ids of its images"):
        VOCFolder(str(folder)).prepare()


@pytest.mark.parametrize("count", [0, -4, 2.5])
def test_split_and_group_counts_below_one_are_refused(count):
    with pytest.raises(ConfigError, match=rf"counts.train is {count}"):
        ProceduralScenes(counts={"train": count, "val": 2})
    with pytest.raises(ConfigError, match=rf"counts.train.one_seen is {count}"):
        PromptSet({"train": {"one_seen": count}})


def test_empty_counts_are_refused_not_taken_for_the_default():
    with pytest.raises(ConfigError, match=r"counts is empty"):
        ProceduralScenes(counts={})
    with pytest.raises(ConfigError, match=r"counts is empty"):
        PromptSet({})


# -- source fingerprints ---------------------------------------------------------------------------


@pytest.mark.workflow
def test_predict_rebuilds_what_another_seed_changed_and_fit_refuses_it_until_then(run, capsys):
    cache = cache_of(run)
    before = {r["id"]: r["source"]["sha256"] for r in cache.manifest()}
    message = cli_error(["fit", *small(run, "--data.init_args.source.init_args.seed", "7")], capsys)
    assert message == (
        f"error: 10 samples of the cache at '{cache.root}' were built from source data that has changed since "
        "(first: scene-train-000000: the scenes were written with seed 0, size 128; data.source asks for seed 7, "
        "size 128). Rerun predict with the same configs: it rebuilds them"
    )
    with pytest.warns(UserWarning, match=r"10 samples were built from source data that has changed since"):
        main(["predict", *small(run, "--data.init_args.source.init_args.seed", "7")])
    after = {r["id"]: r["source"]["sha256"] for r in cache.manifest()}
    assert after.keys() == before.keys() and all(after[i] != before[i] for i in before)
    main(["fit", *small(run, "--data.init_args.source.init_args.seed", "7")])  # the cache fits its source now


@pytest.mark.workflow
def test_an_edited_label_map_is_rebuilt_by_predict_and_refused_by_fit(tmp_path, capsys):
    folder = make_own_folder(tmp_path / "my_voc")
    data = tmp_path / "data.yaml"
    data.write_text(f"data:\n  init_args:\n    source:\n      init_args:\n        root: {folder}\n")
    args = [
        "--config",
        str(REPO / "experiments/own_data.yaml"),
        "--config",
        str(data),
        "--config",
        str(REPO / "experiments/offline.yaml"),
        "--data.init_args.source.init_args.image_size",
        "64",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.max_steps",
        "1",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]
    main(["predict", *args])
    cache = cache_of(tmp_path / "run")
    label_file = folder / "SegmentationClass" / "train1.png"
    labels = np.array(Image.open(label_file))
    labels[labels == 2] = 3  # the user relabels the hot dog of train1 as a dog
    edited = Image.fromarray(labels, mode="P")
    edited.putpalette(Image.open(label_file).getpalette())
    edited.save(label_file)
    assert cli_error(["fit", *args], capsys).startswith(
        f"error: 1 samples of the cache at '{cache.root}' were built from source data that has changed since "
        "(first: train1: JPEGImages/train1.jpg or SegmentationClass/train1.png changed)"
    )
    with pytest.warns(UserWarning, match=r"1 samples were built from source data that has changed since"):
        main(["predict", *args])
    assert next(r for r in cache.manifest() if r["id"] == "train1")["categories"] == ["dog"]
    # A copy with new times and the same bytes is not a change (the hash decides).
    shutil.copy(folder / "JPEGImages" / "train0.jpg", tmp_path / "x.jpg")
    shutil.copy(tmp_path / "x.jpg", folder / "JPEGImages" / "train0.jpg")
    main(["fit", *args])
    # Other bytes of the same size under the same time (a tool that keeps times): fit and test
    # trust size and time, as make does; predict, which reads every file anyway, hashes them.
    image = folder / "JPEGImages" / "val0.jpg"
    size, stat = image.stat().st_size, image.stat()
    other = tmp_path / "other.jpg"
    Image.new("RGB", Image.open(image).size, (200, 10, 10)).save(other, quality=20)
    image.write_bytes(other.read_bytes().ljust(size, b"\0"))  # (a JPEG decoder stops at its end marker)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.warns(UserWarning, match=r"1 samples were built .* \(first: val0: JPEGImages/val0.jpg"):
        main(["predict", *args])


# -- unfinished builds -----------------------------------------------------------------------------


@pytest.mark.workflow
def test_fit_and_test_refuse_an_unfinished_cache_and_say_how_to_finish_it(run, capsys):
    cache = cache_of(run)
    records = cache.manifest()
    # A build killed after 8 of its 10 samples: the last two (the test split) never came.
    cache.manifest_file.rewrite([r for r in records if r["split"] != "test"])
    expected = (
        f"error: The cache at '{cache.root}' is incomplete: split test has 0 of 2 planned samples (its predict run "
        "stopped early). Finish it: rerun that predict command (it goes on from what is there), or use what is "
        "there: --data.init_args.allow_incomplete true"
    )
    assert cli_error(["test", *small(run)], capsys) == expected
    main(["fit", *small(run)])  # (train and val are whole)
    cache.manifest_file.rewrite([r for r in records if r["id"] != "scene-train-000003"])
    assert "split train has 5 of 6 planned samples" in cli_error(["fit", *small(run)], capsys)
    with pytest.warns(UserWarning, match="going on with what is there"):
        main(["fit", *small(run, "--data.init_args.allow_incomplete", "true")])
    main(["predict", *small(run)])  # finishes it
    assert len(cache.manifest()) == 10
    main(["test", *small(run, "--ckpt_path", "last")])


# -- manifest lines that parse but hold wrong values ------------------------------------------------


@pytest.mark.workflow
@pytest.mark.parametrize(
    "edit, fit_says, predict_says",
    [
        (
            {"categories": "disc"},
            "manifest.jsonl:1: sample scene-train-000000: categories is 'disc', not a list of category names; the "
            "list is damaged: rerun the build that wrote it",
            r"dropped 1 damaged lines \(line 1\)",
        ),
        (
            {"categories": ["zebra"]},
            "manifest.jsonl: sample scene-train-000000 names ['zebra'], which the cache was not built over: the line "
            "is damaged. Rerun the cache's predict command",
            r"1 listed samples name categories outside the cache's vocabulary \(first: scene-train-000000",
        ),
        (
            {"split": 3},
            "manifest.jsonl:1: sample scene-train-000000: split is 3, not a split's name",
            r"dropped 1 damaged lines \(line 1\)",
        ),
    ],
)
def test_manifest_values_of_the_wrong_kind_are_named_and_rebuilt(run, capsys, edit, fit_says, predict_says):
    cache = cache_of(run)
    lines = cache.manifest_path.read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), **edit})
    cache.manifest_path.write_text("\n".join(lines) + "\n")
    message = cli_error(["fit", *small(run)], capsys)
    assert fit_says in message and "\n" not in message
    with pytest.warns(UserWarning, match=predict_says):
        main(["predict", *small(run)])
    first = next(r for r in cache.manifest() if r["id"] == "scene-train-000000")
    assert first["categories"] != "disc" and first["categories"] != ["zebra"] and first["split"] == "train"
    main(["fit", *small(run)])
