"""Protocol II and grounded generation: grounded images on disk (VOC palette PNGs, COCO RLE),
real VOC/COCO readers, segmenters, ZS3 metrics and the Tab. 2 report, through the real CLI."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO as COCOApi

from conftest import REPO, assert_same_weights, last_weights, run_cli, scenes_args
from grounded_diffusion.cli import main
from grounded_diffusion.data.grounded_folder import rle_annotations, semantic_labels
from grounded_diffusion.data.prompts import PromptList
from grounded_diffusion.data.segmentation_sets import (
    COCOSegmentationSet,
    FolderSegmentationSet,
    VOCSegmentationSet,
)
from grounded_diffusion.data.voc import VOCFolder, voc_palette, write_voc_folder
from grounded_diffusion.data.vocabulary import COCO, PASCAL_VOC, CategorySplit
from grounded_diffusion.errors import ConfigError
from grounded_diffusion.metrics import SemanticIoU, zs3_summary
from grounded_diffusion.models.segmenters import instance_targets, semantic_scores
from protocol2_data import VOC_IMAGES, make_coco, make_voc

pytestmark = pytest.mark.workflow  # runs the CLI or a whole workflow: `make test`, not `make test-fast`

GENERATE = str(REPO / "experiments" / "generate.yaml")
OFFLINE = str(REPO / "experiments" / "offline.yaml")
P2 = REPO / "experiments" / "protocol2"


# -- pure pieces, against hand-computed cases and other libraries ---------------------------------


def test_label_map_takes_the_most_probable_object_above_threshold_with_an_ignore_band():
    probs = torch.tensor(
        [[[[0.9, 0.3, 0.55, 0.2]], [[0.6, 0.1, 0.1, 0.95]], [[0.99, 0.99, 0.99, 0.99]]]]
    )  # [1, 3, 1, 4]
    labels = torch.tensor([[4, 7, 0]])  # third slot empty: its probabilities never count
    assert semantic_labels(probs, labels, 0.5).tolist() == [[[4, 0, 4, 7]]]
    assert semantic_labels(probs, labels, 0.5, ignore_band=0.1).tolist() == [[[4, 0, 255, 7]]]


def test_rle_masks_decode_to_the_masks():
    masks = np.random.default_rng(0).random((2, 17, 23)) > 0.6
    annotations = rle_annotations(masks)
    for mask, annotation in zip(masks, annotations):
        rle = {**annotation["segmentation"], "counts": annotation["segmentation"]["counts"].encode()}
        assert (coco_mask.decode(rle) == mask).all()
        assert annotation["area"] == mask.sum()
    assert rle_annotations(np.zeros((0, 4, 4), bool)) == []


def test_semantic_iou_matches_torchmetrics_jaccard():
    from torchmetrics.classification import MulticlassJaccardIndex

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (4, 16, 16), generator=g)
    target[:, :2] = 255
    preds = torch.where(
        torch.rand(4, 16, 16, generator=g) < 0.6,
        target.clamp(max=4),
        torch.randint(0, 5, (4, 16, 16), generator=g),
    )
    ours = SemanticIoU(5)
    ours.update(preds[:2], target[:2])
    ours.update(preds[2:], target[2:])
    reference = MulticlassJaccardIndex(5, average="none", ignore_index=255)(preds, target)
    torch.testing.assert_close(ours.compute().float(), reference)


def test_zs3_summary_counts_background_as_seen_and_takes_the_harmonic_mean():
    split = CategorySplit(("a", "b", "c"), unseen=("c",))
    summary = zs3_summary(
        torch.tensor([0.9, 0.5, float("nan"), 0.2]), split, background=True
    )  # background, a, b (absent), c
    assert summary["seen_miou"] == pytest.approx(70.0)  # (90 + 50) / 2, b left out
    assert summary["unseen_miou"] == pytest.approx(20.0)
    assert summary["harmonic_miou"] == pytest.approx(2 * 70 * 20 / 90)
    ignored = zs3_summary(
        torch.tensor([0.5, float("nan"), 0.2]), split
    )  # a, b (absent), c; no background class
    assert ignored["seen_miou"] == pytest.approx(50.0) and list(ignored["per_category"]) == ["a", "b", "c"]


def test_maskformer_semantic_scores_match_transformers_post_processing():
    from transformers import MaskFormerImageProcessor
    from transformers.models.maskformer.modeling_maskformer import MaskFormerForInstanceSegmentationOutput

    g = torch.Generator().manual_seed(0)
    class_logits, mask_logits = torch.randn(2, 6, 5, generator=g), torch.randn(2, 6, 8, 8, generator=g)
    ours = semantic_scores(class_logits, mask_logits, (32, 32)).argmax(1)
    output = MaskFormerForInstanceSegmentationOutput(
        class_queries_logits=class_logits, masks_queries_logits=mask_logits
    )
    reference = MaskFormerImageProcessor().post_process_semantic_segmentation(
        output, target_sizes=[(32, 32)] * 2
    )
    assert torch.equal(ours, torch.stack(reference))


def test_instance_targets_one_mask_per_present_class_ignore_in_none():
    labels = torch.tensor([[[0, 2, 2], [255, 2, 0]], [[1, 1, 1], [1, 1, 1]]])
    masks, classes = instance_targets(labels, num_classes=3)
    assert classes[0].tolist() == [0, 2] and classes[1].tolist() == [1]
    assert masks[0][1].tolist() == [[0, 1, 1], [0, 1, 0]] and masks[0][0][1, 0] == 0  # 255 in no mask


def test_prompt_file_parsing(tmp_path):
    good = tmp_path / "prompts.txt"
    good.write_text("# comment\na photo of a dog on a sofa | dog, sofa\n\na cat | cat\n")
    prompts = PromptList(file=str(good))
    assert prompts.classes == ["dog", "sofa", "cat"] and len(prompts.entries) == 2
    sample = prompts.dataset(CategorySplit(tuple(prompts.classes)))[1]
    assert sample["prompt"] == "a cat" and sample["categories"] == ["cat"] and sample["id"] == "000001"
    bad = tmp_path / "bad.txt"
    bad.write_text("a dog without categories\n")
    with pytest.raises(ConfigError, match="bad.txt:1"):
        PromptList(file=str(bad))
    with pytest.raises(ConfigError, match=r"prompts\[0\].*needs both `prompt` and `categories`"):
        PromptList(prompts=[{"prompt": "a dog"}])


# -- real-format readers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return make_voc(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory) -> tuple[Path, Path]:
    return make_coco(tmp_path_factory.mktemp("coco"))


def test_voc_reader_is_torchvisions_layout(voc_root):
    dataset = VOCSegmentationSet(str(voc_root), "train")
    image, labels = dataset[2]
    assert image.shape == (3, 48, 48) and labels.dtype == torch.uint8
    assert labels[5, 5] == 17 and labels[30, 30] == 8 and labels[0, 0] == 255
    assert dataset.labels_present(2) == {17, 8}
    with pytest.raises(ConfigError, match="VOCdevkit"):
        VOCSegmentationSet(str(voc_root / "nowhere"))


def test_coco_reader_paints_instances_by_name_and_crowds_as_ignore(coco_files):
    images, annotations = coco_files
    dataset = COCOSegmentationSet(str(images), str(annotations))
    _, labels = dataset[1]  # a cat with a bear on top (smaller, painted last)
    assert labels[10, 10] == COCO.index("cat") + 1 and labels[25, 25] == COCO.index("bear") + 1
    _, labels = dataset[2]
    assert labels[42, 5] == 255 and labels[20, 20] == COCO.index("dog") + 1  # crowd person -> ignore
    assert dataset.labels_present(1) == {COCO.index("cat") + 1, COCO.index("bear") + 1}


def test_mixture_keeps_real_images_of_seen_classes_only(voc_root):
    from datamodules.segmentation import SegmentationDataModule

    data = SegmentationDataModule(
        "pascal",
        "zs3",
        train=[VOCSegmentationSet(str(voc_root), "train", seen_only=True)],
        val=VOCSegmentationSet(str(voc_root), "val"),
        image_size=32,
        batch_size=1,
    )
    data.setup("fit")
    assert len(data.train_set) == len(VOC_IMAGES["train"]) - 1  # the image with a sheep is out
    assert data.training_sets() == ["real (seen only)"]
    sample = data.val_set[1]  # evaluation: labels at the original resolution, background ignored
    assert sample["image"].shape == (3, 32, 32) and sample["labels"].shape == (48, 48)
    assert set(sample["labels"].unique().tolist()) == {PASCAL_VOC.index("tvmonitor"), 255}


def test_segmentation_validation_leaves_the_global_rng_alone_and_training_shuffles_by_epoch(voc_root):
    from datamodules.segmentation import SegmentationDataModule
    from grounded_diffusion.data.samplers import EpochShuffle

    data = SegmentationDataModule(
        "pascal",
        "zs3",
        train=[VOCSegmentationSet(str(voc_root), "train")],
        val=VOCSegmentationSet(str(voc_root), "val"),
        image_size=32,
        batch_size=1,
    )
    data.setup("fit")
    assert isinstance(data.train_dataloader().sampler, EpochShuffle)
    before = torch.get_rng_state()
    assert len(list(data.val_dataloader())) == len(VOC_IMAGES["val"])
    assert torch.equal(torch.get_rng_state(), before)


def test_training_batches_are_flipped_with_their_labels_and_evaluation_batches_not(voc_root):
    from lightning import Trainer

    from datamodules.segmentation import SegmentationDataModule

    image = torch.arange(64 * 3 * 4 * 5).reshape(64, 3, 4, 5)
    batch = {"image": image, "labels": image[:, 0] + 1}
    torch.manual_seed(0)
    expected_flips = torch.rand(64) < 0.5  # the draws the datamodule makes, one per image
    assert 0 < expected_flips.sum() < 64
    data = SegmentationDataModule("pascal", "zs3", val=VOCSegmentationSet(str(voc_root), "val"))
    data.trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    data.trainer.training = True
    torch.manual_seed(0)
    flipped = data.on_after_batch_transfer(batch, 0)
    for i, flip in enumerate(expected_flips.tolist()):  # columns reversed, labels alike
        reference = image[i][..., [4, 3, 2, 1, 0]] if flip else image[i]
        assert torch.equal(flipped["image"][i], reference) and torch.equal(
            flipped["labels"][i], reference[0] + 1
        )
    data.trainer.validating = True
    assert data.on_after_batch_transfer(batch, 0) is batch


# -- grounded generation and synthetic sets through the CLI --------------------------------------


@pytest.fixture(scope="module")
def head_checkpoint(scene_cache) -> Path:
    """A head trained (briefly) on the scenes with the offline backbone settings."""
    checkpoint = scene_cache / "checkpoints" / "last.ckpt"
    if not checkpoint.exists():
        run_cli(["fit", *scenes_args(scene_cache)])
    return checkpoint


def generate(out: Path, checkpoint: Path | None, *extra: str) -> None:
    args = [
        "predict",
        "--config",
        GENERATE,
        "--config",
        OFFLINE,
        "--trainer.default_root_dir",
        str(out),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]
    main(args + (["--ckpt_path", str(checkpoint)] if checkpoint else []))


def test_grounded_generation_writes_voc_pngs_and_coco_rle_that_agree(head_checkpoint, tmp_path, capsys):
    generate(tmp_path, head_checkpoint, "--data.init_args.batch_size", "3")
    ids = sorted(p.stem for p in (tmp_path / "JPEGImages").glob("*.jpg"))
    assert ids == ["000000", "000001", "000002", "000003"]  # experiments/prompts/examples.txt
    classes = (tmp_path / "classes.txt").read_text().split()
    assert classes == ["dog", "cat", "horse", "sheep", "train", "bus"]
    coco = COCOApi(str(tmp_path / "annotations.json"))
    assert len(coco.getImgIds()) == 4 and len(coco.getAnnIds()) == 6  # one mask per named category
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        png = Image.open(tmp_path / "SegmentationClass" / Path(info["file_name"]).with_suffix(".png").name)
        assert png.mode == "P" and png.getpalette()[: 3 * 21] == voc_palette()[: 3 * 21]
        labels = np.array(png)
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            name = coco.loadCats(annotation["category_id"])[0]["name"]
            # every pixel labelled k lies in category k's own mask (prob >= threshold)
            assert not ((labels == classes.index(name) + 1) & ~coco.annToMask(annotation).astype(bool)).any()
    assert (tmp_path / "overlays" / "000000.png").exists()
    assert "grounded images: 4" in capsys.readouterr().out


def test_grounded_generation_resumes_and_needs_a_trained_head(head_checkpoint, tmp_path):
    generate(tmp_path, head_checkpoint)
    manifest = tmp_path / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "JPEGImages").glob("*.jpg")}
    # an interrupted run: the last sample's line is lost, a temporary file is left behind
    manifest.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    (tmp_path / "JPEGImages" / ".000003.jpg.tmp123").write_bytes(b"partial")
    generate(tmp_path, head_checkpoint)
    assert len(manifest.read_text().splitlines()) == 4
    redone = [p.stem for p, t in kept.items() if p.stat().st_mtime_ns != t]
    assert len(redone) == 1 and not list((tmp_path / "JPEGImages").glob(".*"))
    with pytest.raises(SystemExit, match="ckpt_path"):
        generate(tmp_path / "untrained", None)


@pytest.fixture(scope="module")
def synthetic_voc(head_checkpoint, tmp_path_factory) -> Path:
    """A synthetic PASCAL set (one- and two-object prompts over all 20 classes) from the build config."""
    out = tmp_path_factory.mktemp("synthetic_voc")
    run_cli(
        [
            "predict",
            "--config",
            str(P2 / "pascal_build.yaml"),
            "--config",
            OFFLINE,
            "--ckpt_path",
            str(head_checkpoint),
            "--trainer.default_root_dir",
            str(out),
            "--data.init_args.max_per_group",
            "3",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    return out


def test_synthetic_set_is_a_voc_style_folder(synthetic_voc):
    dataset = FolderSegmentationSet(str(synthetic_voc))
    assert len(dataset) == 6 and dataset.classes == list(PASCAL_VOC)
    assert dataset.describe() == "synthetic (mixture)"
    image, labels = dataset[0]
    assert image.shape == (3, 128, 128) and labels.shape == (128, 128)
    assert VOCFolder(str(synthetic_voc)).ids("train") == dataset.ids  # the grounding head's reader too
    with pytest.raises(ConfigError, match="predict"):
        FolderSegmentationSet(str(synthetic_voc / "missing"))


# -- segmenters: fit and ZS3 test through the CLI, and the Tab. 2 report ---------------------------


def folder_sets(*roots: Path) -> str:
    """A ``data.init_args.train`` value: synthetic folders (jsonargparse cannot override one list item)."""
    sets = [
        {
            "class_path": "grounded_diffusion.data.segmentation_sets.FolderSegmentationSet",
            "init_args": {"root": str(r)},
        }
        for r in roots
    ]
    return json.dumps(sets)


def segmenter_run(config: Path, out: Path, *extra: str, batch_size: int = 4) -> dict:
    args = [
        "--config",
        str(config),
        *extra,
        "--config",
        str(P2 / "offline.yaml"),
        "--trainer.default_root_dir",
        str(out),
        "--data.init_args.batch_size",
        str(batch_size),
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]
    main(["fit", *args])
    main(["test", *args, "--ckpt_path", "last"])
    return json.loads((out / "zs3" / "report.json").read_text())


@pytest.mark.parametrize("architecture", ["maskformer", "mask2former", "deeplabv3"])
def test_segmenter_trains_on_synthetic_and_scores_zs3_on_real_voc(
    architecture, synthetic_voc, voc_root, tmp_path, capsys
):
    extra = (
        ["--config", str(P2 / "deeplabv3.yaml")]
        if architecture == "deeplabv3"
        else ["--model.init_args.architecture", architecture]
    )
    report = segmenter_run(
        P2 / "pascal_maskformer.yaml",
        tmp_path,
        *extra,
        "--data.init_args.train",
        folder_sets(synthetic_voc),
        "--data.init_args.val.init_args.root",
        str(voc_root),
    )
    assert report["architecture"] == architecture and report["trained_on"] == ["synthetic (mixture)"]
    assert report["unseen"] == ["pottedplant", "sheep", "sofa", "train", "tvmonitor"]
    for key in ("seen_miou", "unseen_miou", "harmonic_miou"):
        assert 0 <= report[key] <= 100
    assert "Synthetic / 15+5 (# objects)" in (tmp_path / "zs3" / "report.md").read_text()


def test_mixture_with_real_seen_images_and_table2(synthetic_voc, voc_root, tmp_path, capsys):
    common = ["--data.init_args.val.init_args.root", str(voc_root)]
    synthetic = segmenter_run(
        P2 / "pascal_maskformer.yaml",
        tmp_path / "a",
        "--data.init_args.train",
        folder_sets(synthetic_voc),
        *common,
    )
    # the overlay as shipped, with the synthetic folder of this test (its VOC root follows val's)
    overlay = tmp_path / "with_real_seen.yaml"
    overlay.write_text(
        (P2 / "with_real_seen.yaml").read_text().replace("data/protocol2/pascal_mixture", str(synthetic_voc))
    )
    mixture = segmenter_run(P2 / "pascal_maskformer.yaml", tmp_path / "d", "--config", str(overlay), *common)
    assert mixture["trained_on"] == ["synthetic (mixture)", "real (seen only)"] and mixture["real_seen"]
    from grounded_diffusion.reports import main as reports

    reports(
        [
            "--table",
            "2",
            "--out",
            str(tmp_path / "table2"),
            str(tmp_path / "a/zs3/report.json"),
            str(tmp_path / "d/zs3/report.json"),
        ]
    )
    text = (tmp_path / "table2" / "report.md").read_text()
    assert (
        "## PASCAL VOC" in text
        and "| a | maskformer | ✗ | mixture |" in text
        and "| d | maskformer | ✓ | mixture |" in text
    )
    assert synthetic["num_seen"] == 15 and synthetic["num_unseen"] == 5


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_segmenter_fit_resumed_trains_the_weights_of_one_never_stopped(
    num_workers, synthetic_voc, voc_root, tmp_path, monkeypatch
):
    """Its training draws from the global random stream (the flips, and Mask2Former's loss points),
    which ``last.ckpt`` carries, also with loader workers; the stop at step 2 is part-way through
    the first epoch."""
    import datamodules.segmentation

    flipped = []  # the training batches the datamodule flipped: each one, in the training process
    flip = datamodules.segmentation.flip_horizontally
    monkeypatch.setattr(
        datamodules.segmentation,
        "flip_horizontally",
        lambda batch: flipped.append(os.getpid()) or flip(batch),
    )

    def fit(out: Path, *extra: str) -> dict[str, torch.Tensor]:
        main(
            [
                "fit",
                "--config",
                str(P2 / "pascal_maskformer.yaml"),
                "--model.init_args.architecture",
                "mask2former",
                "--data.init_args.train",
                folder_sets(synthetic_voc),
                "--data.init_args.val.init_args.root",
                str(voc_root),
                "--config",
                str(P2 / "offline.yaml"),
                "--data.init_args.num_workers",
                str(num_workers),
                "--trainer.default_root_dir",
                str(out),
                "--data.init_args.batch_size",
                "2",
                "--trainer.max_steps",
                "4",
                "--trainer.val_check_interval",
                "2",
                "--trainer.logger",
                "false",
                "--trainer.enable_progress_bar",
                "false",
                *extra,
            ]
        )
        return last_weights(out)

    never_stopped = fit(tmp_path / "a")
    assert flipped == [os.getpid()] * 4
    # Stopped after step 2 of the same 4-step fit (as max_time stops one): the learning-rate
    # schedule, which runs over the whole fit, goes on where it was.
    fit(
        tmp_path / "b",
        "--trainer.callbacks+="
        + json.dumps({"class_path": "test_checkpoints.StopAt", "init_args": {"step": 2}}),
    )
    assert torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2
    assert_same_weights(fit(tmp_path / "b", "--ckpt_path", "last"), never_stopped)
    with pytest.raises(SystemExit, match="trained with lr_schedule 'poly', this fit has 'constant'"):
        fit(tmp_path / "b", "--model.init_args.lr_schedule", "constant", "--ckpt_path", "last")
    # Outside a fit, the checkpoint loads as any Lightning one does (no trainer, nothing to resume).
    from lightning_modules.segmentation import SemanticSegmentationModule

    loaded = SemanticSegmentationModule.load_from_checkpoint(
        tmp_path / "b/checkpoints/last.ckpt", weights_only=True
    )
    assert_same_weights(loaded.state_dict(), never_stopped)


def test_segmenter_learning_rate_follows_maskformers_poly_schedule_or_stays_constant():
    """Against the formula by hand: lr * (1 - step / total) ** 0.9, over the fit's total steps."""
    from types import SimpleNamespace

    from lightning_modules.segmentation import SemanticSegmentationModule

    def learning_rates(schedule: str) -> list[float]:
        module = SemanticSegmentationModule("shapes", "lraspp", None, False, lr=1e-3, lr_schedule=schedule)
        module.trainer = SimpleNamespace(estimated_stepping_batches=10)
        configured = module.configure_optimizers()
        optimizer, scheduler = configured["optimizer"], configured.get("lr_scheduler", {}).get("scheduler")
        rates = []
        for _ in range(11):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        return rates

    assert learning_rates("poly") == pytest.approx(
        [1e-3 * (1 - step / 10) ** 0.9 for step in range(11)], abs=1e-12
    )
    assert learning_rates("constant") == [1e-3] * 11
    with pytest.raises(ConfigError, match="lr_schedule 'cosine' is not one of"):
        SemanticSegmentationModule("shapes", "lraspp", None, False, lr_schedule="cosine")
    endless = SemanticSegmentationModule("shapes", "lraspp", None, False)
    endless.trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))  # max_steps -1, max_epochs -1
    with pytest.raises(ConfigError, match="set trainer.max_steps"):
        endless.configure_optimizers()


def test_coco_segmenter_scores_zs3_on_real_coco(synthetic_voc, coco_files, tmp_path, capsys):
    images, annotations = coco_files
    # a COCO-labelled synthetic folder: the VOC-named one relabelled is not needed; train on real COCO instead
    report = segmenter_run(
        P2 / "coco_maskformer.yaml",
        tmp_path,
        "--data.init_args.train",
        json.dumps(
            [
                {
                    "class_path": "grounded_diffusion.data.segmentation_sets.COCOSegmentationSet",
                    "init_args": {"images": str(images), "annotations": str(annotations), "seen_only": True},
                }
            ]
        ),
        "--data.init_args.val.init_args.images",
        str(images),
        "--data.init_args.val.init_args.annotations",
        str(annotations),
        batch_size=2,  # two seen-only images: one full batch
    )
    assert report["vocabulary"] == "coco" and report["num_seen"] == 65 and report["num_unseen"] == 15
    assert report["per_category"]["dog"] is not None and len(report["per_category"]) == 81
    assert os.path.exists(tmp_path / "zs3" / "report.md")


def test_two_process_generation_writes_every_prompt_once(head_checkpoint, tmp_path):
    generate(
        tmp_path,
        head_checkpoint,
        "--trainer.strategy",
        "ddp_spawn",
        "--trainer.devices",
        "2",
        "--data.init_args.batch_size",
        "1",
    )
    assert sorted(
        json.loads(line)["id"] for line in (tmp_path / "manifest.jsonl").read_text().splitlines()
    ) == [f"{i:06d}" for i in range(4)]
    assert len(COCOApi(str(tmp_path / "annotations.json")).getImgIds()) == 4  # written once, after both ranks


def test_missing_backbone_weights_name_the_file_and_the_switch(monkeypatch, tmp_path):
    from urllib.error import URLError

    from grounded_diffusion.models.segmenters import DeepLabV3, MaskFormer, MissingBackboneWeightsError

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(MissingBackboneWeightsError, match=r"resnet50-.*\.pth.*pretrained_backbone: false"):
        DeepLabV3(21, "resnet50", "DEFAULT")
    with pytest.raises(MissingBackboneWeightsError, match="hf download microsoft/resnet-101"):
        MaskFormer(21, "maskformer", "microsoft/resnet-101")  # HF_HUB_OFFLINE=1 in the tests


@pytest.mark.parametrize("background", ["ignore", "class"])
def test_zs3_scores_at_original_resolution_with_background_ignored_or_a_class(background, tmp_path):
    """A hand-made VOC val set of two sizes (5x9 and 6x4, thin structures that resizing to 8 px
    would distort); the segmenter says "aeroplane" everywhere on the red image and "bicycle" on the
    green one. The module's IoUs equal a plain numpy count over the original label maps."""
    from lightning import Trainer

    from datamodules.segmentation import SegmentationDataModule
    from lightning_modules.segmentation import SemanticSegmentationModule

    aeroplane, bicycle = PASCAL_VOC.index("aeroplane") + 1, PASCAL_VOC.index("bicycle") + 1  # VOC labels 1, 2
    red, green = np.zeros((5, 9, 3), np.uint8), np.zeros((6, 4, 3), np.uint8)
    red[..., 0], green[..., 1] = 255, 255
    labels_red, labels_green = np.zeros((5, 9), np.uint8), np.zeros((6, 4), np.uint8)
    labels_red[:, :2], labels_red[:, 2], labels_red[0, 8] = aeroplane, bicycle, 255
    labels_green[:2] = bicycle
    write_voc_folder(
        tmp_path / "VOCdevkit" / "VOC2012",
        PASCAL_VOC,
        {"val": [("red", red, labels_red), ("green", green, labels_green)]},
    )

    module = SemanticSegmentationModule(
        "pascal", backbone=None, pretrained_backbone=False, num_queries=4, background=background
    )
    offset = background == "class"  # the segmenter's label of VOC label k: k - 1 with background ignored

    def constant_scores(images):
        label = torch.where(images[:, 0].mean((1, 2)) > 0.5, aeroplane, bicycle) - 1 + offset
        return F.one_hot(label, module.num_classes).float()[:, :, None, None].expand(-1, -1, 8, 8)

    module.forward = constant_scores
    data = SegmentationDataModule(
        "pascal",
        "zs3",
        val=VOCSegmentationSet(str(tmp_path), "val"),
        image_size=8,
        batch_size=2,
        num_workers=0,
        background=background,
    )
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        module, data
    )
    results = module.results["test"]

    # Plain computation at original resolution: VOC labels -> the segmenter's, then Σ∩/Σ∪ per class.
    def segmenter_labels(labels):
        out = labels.astype(np.int64) - 1 + offset
        out[labels == 255] = 255
        out[labels == 0] = 0 if offset else 255
        return out

    truth = [segmenter_labels(labels_red), segmenter_labels(labels_green)]
    preds = [
        np.full(labels_red.shape, aeroplane - 1 + offset),
        np.full(labels_green.shape, bicycle - 1 + offset),
    ]
    names = (["background"] if offset else []) + list(PASCAL_VOC)
    for k, name in enumerate(names):
        if name not in ("background", "aeroplane", "bicycle"):
            continue
        inter = sum(int(((t == k) & (p == k) & (t != 255)).sum()) for t, p in zip(truth, preds))
        union = sum(int((((t == k) | (p == k)) & (t != 255)).sum()) for t, p in zip(truth, preds))
        assert results["per_category"][name] == pytest.approx(100 * inter / union), name
    # By hand: background ignored -> aeroplane 10/15, bicycle 8/13; a class -> 10/44, 8/29, background 0.
    expected = (
        {"aeroplane": 10 / 15, "bicycle": 8 / 13}
        if background == "ignore"
        else {"aeroplane": 10 / 44, "bicycle": 8 / 29, "background": 0}
    )
    for name, iou in expected.items():
        assert results["per_category"][name] == pytest.approx(100 * iou)
    assert ("background" in results["per_category"]) == (background == "class")


def test_deeplabv3_loss_is_the_mean_over_labelled_pixels_and_zero_without_any():
    from grounded_diffusion.models.segmenters import DeepLabV3

    torch.manual_seed(0)
    segmenter = DeepLabV3(3, "mobilenet_v3_large", None).eval()  # no dropout: two calls, the same scores
    images, labels = torch.rand(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    labels[0, :16] = 255
    expected = F.cross_entropy(segmenter.scores(images), labels, ignore_index=255)  # torch's own mean
    torch.testing.assert_close(segmenter.loss(images, labels), expected)
    nothing = segmenter.loss(images, torch.full((2, 32, 32), 255))
    assert nothing.item() == 0 and nothing.requires_grad


def test_inline_prompts_replace_the_file_and_a_null_file_override_names_the_fix(capsys):
    inline = '{class_path: PromptList, init_args: {file: null, prompts: [{prompt: "a photograph of a dog", categories: [dog]}]}}'
    with pytest.raises(SystemExit):
        main(
            [
                "predict",
                "--config",
                GENERATE,
                "--config",
                OFFLINE,
                "--data.init_args.prompts",
                inline,
                "--print_config",
            ]
        )
    printed = capsys.readouterr().out
    assert "file: null" in printed and "a photograph of a dog" in printed
    # jsonargparse turns this override into the string "None": the error says what to write instead.
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "predict",
                "--config",
                GENERATE,
                "--config",
                OFFLINE,
                "--data.init_args.prompts.init_args.file",
                "null",
            ]
        )
    assert "set the whole PromptList" in str(exit_info.value.code)
