"""The guide docs/own_data.md, "Train on your own data", run as written on a small VOC-format folder with its own
classes: a `background` first line, multi-word names, no trailing newline, no test image set."""

import json
import shlex
from pathlib import Path

import pytest

from conftest import REPO, doc_blocks
from grounded_diffusion.cli import main
from grounded_diffusion.data.segmentation_sets import FolderSegmentationSet
from grounded_diffusion.data.voc import VOCFolder, write_voc_folder
from grounded_diffusion.data.vocabulary import CategorySplit, read_classes_file
from protocol2_data import rectangle_image

pytestmark = pytest.mark.workflow  # runs the CLI or a whole workflow: `make test`, not `make test-fast`

CLASSES = ["traffic light", "hot dog", "dog"]
# (label, box) per image: every class alone and in pairs, in train and val.
IMAGES = {
    "train": [
        [(1, 4, 4, 30, 30)],
        [(2, 10, 10, 40, 44)],
        [(3, 0, 0, 20, 20), (2, 24, 24, 46, 46)],
        [(3, 6, 6, 26, 40)],
        [(1, 2, 2, 20, 40), (3, 24, 4, 46, 30)],
        [(2, 4, 20, 44, 44)],
    ],
    "val": [[(1, 4, 4, 30, 30)], [(3, 8, 8, 40, 40)], [(2, 2, 2, 30, 22), (1, 30, 30, 46, 46)]],
}

OWN_DATA_GUIDE = "docs/own_data.md"


def make_own_folder(root: Path) -> Path:
    samples = {
        split: [
            (f"{split}{i}", *rectangle_image(i + 10 * (split == "val"), boxes))
            for i, boxes in enumerate(images)
        ]
        for split, images in IMAGES.items()
    }
    write_voc_folder(root, CLASSES, samples)
    (root / "classes.txt").write_text(
        "background\n" + "\n".join(CLASSES)
    )  # a VOC tool's list, no final newline
    return root


def guide_commands(heading: str) -> list[list[str]]:
    """The ``lightning`` commands of the section's bash blocks, comments dropped, continued lines
    joined."""
    lines = "".join(doc_blocks(heading, "bash", OWN_DATA_GUIDE)).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True)[1:] for line in lines if line.startswith("lightning")]


@pytest.fixture
def own_folder(tmp_path) -> Path:
    return make_own_folder(tmp_path / "my_voc")


def test_classes_file_with_background_line_and_multi_word_names(own_folder):
    assert read_classes_file(own_folder / "classes.txt") == tuple(CLASSES)
    assert VOCFolder(str(own_folder)).classes == CLASSES
    assert VOCFolder(str(own_folder)).splits == ["train", "val"]  # what the folder has
    assert FolderSegmentationSet(str(own_folder)).classes == CLASSES
    split = CategorySplit.named(str(own_folder / "classes.txt"), seen=["dog", "hot dog"])
    assert split.unseen == ("traffic light",)
    assert CategorySplit.named(CLASSES, unseen=["hot dog"]).seen == ("traffic light", "dog")


def test_readme_own_data_commands_run_as_written(own_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overlay = doc_blocks("# Train on your own data", "yaml", OWN_DATA_GUIDE)[0].replace(
        "data/my_voc", str(own_folder)
    )
    Path("my_data.yaml").write_text(overlay)
    small = [
        "--config",
        str(REPO / "experiments/offline.yaml"),
        "--data.init_args.source.init_args.image_size",
        "128",
        "--data.init_args.batch_size",
        "2",
        "--trainer.max_steps",
        "3",
        "--trainer.val_check_interval",
        "3",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]
    for command in guide_commands("# Train on your own data")[:3]:
        command = [str(REPO / a) if a.startswith("experiments/") else a for a in command]
        main([*command, *small])
    root = tmp_path / "outputs" / "offline" / "my_voc-splitall"
    cache = json.loads(next(root.glob("cache-*/cache.json")).read_text())
    assert cache["vocabulary"] == CLASSES
    metrics = json.loads((root / "report" / "metrics.json").read_text())
    assert set(metrics["per_category"]) == set(CLASSES)
    # Tested on val (the folder has no test set): traffic light alone, dog alone, hot dog + traffic light.
    groups = metrics["groups"]["ours"]
    assert [groups[g]["objects"] for g in ("all", "one_unseen", "one_seen", "two_seen_unseen")] == [
        4,
        1,
        1,
        2,
    ]


def test_the_offline_backbone_commands_run_with_the_shapes_world_sd(own_folder, tmp_path, monkeypatch):
    """docs/own_data.md, "What an offline backbone can and cannot show": its three commands, then
    the shapes world's SD overlay at the end, as the guide says."""
    monkeypatch.chdir(tmp_path)
    Path("my_data.yaml").write_text(
        doc_blocks("# Train on your own data", "yaml", OWN_DATA_GUIDE)[0].replace(
            "data/my_voc", str(own_folder)
        )
    )
    commands = guide_commands("## What an offline backbone can and cannot show")
    assert len(commands) == 3 and all("--data.init_args.max_per_group" in c for c in commands)
    small = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.logger", "false"]
    small += ["--data.init_args.batch_size", "2", "--trainer.enable_progress_bar", "false"]
    shapes_sd = ["--config", str(REPO / "experiments/backbones/shapes_sd.yaml")]
    for command in commands:
        command = [str(REPO / a) if a.startswith("experiments/") else a for a in command]
        main([*command, *small, *shapes_sd])
    root = tmp_path / "outputs" / "offline" / "my_voc-splitall"
    cache = json.loads(next(root.glob("cache-*/cache.json")).read_text())
    assert cache["backbone"]["model_id"] == "embedded/shapes-sd"
    assert set(json.loads((root / "report" / "metrics.json").read_text())["per_category"]) == set(CLASSES)


def test_readme_own_data_segmenter_commands_run_as_written(own_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("my_segmentation.yaml").write_text(
        f"data:\n  init_args:\n    val:\n      init_args:\n        root: {own_folder}\n    unseen: [hot dog]\n"
    )
    small = [
        "--config",
        str(REPO / "experiments/protocol2/offline.yaml"),
        "--data.init_args.batch_size",
        "2",
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]
    commands = [
        c for c in guide_commands("# Train on your own data") if "experiments/protocol2/own_data.yaml" in c
    ]
    assert len(commands) == 2
    for command in commands:
        command = [str(REPO / a) if a.startswith("experiments/") else a for a in command]
        main([*command, *small])
    report = json.loads(
        (tmp_path / "outputs/offline/protocol2_my_voc_maskformer/zs3/report.json").read_text()
    )
    assert report["unseen"] == ["hot dog"] and report["trained_on"] == ["real"]
    assert set(report["per_category"]) == {"background", *CLASSES}
