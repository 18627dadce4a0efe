import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.triplets import TripletDataModule, TripletSamples
from grounded_diffusion.data.cache import FORMAT_VERSION, CacheError, TripletCache, pack_masks, unpack_masks
from grounded_diffusion.data.procedural_scenes import ProceduralScenes, render_scene, shape_mask
from grounded_diffusion.data.voc import VOCFolder, voc_palette, write_voc_folder
from grounded_diffusion.data.vocabulary import SCENES, CategorySplit, UnknownCategoryError
from grounded_diffusion.errors import ConfigError, UserError


def test_scenes_are_deterministic_with_exact_masks():
    image, labels, names = render_scene(7, 64, seed=3)
    image2, labels2, _ = render_scene(7, 64, seed=3)
    assert np.array_equal(image, image2) and np.array_equal(labels, labels2)
    assert 1 <= len(names) <= 2 and set(np.unique(labels)) == {0, *(SCENES.index(n) + 1 for n in names)}
    assert not np.array_equal(labels, render_scene(8, 64, seed=3)[1])


def test_shape_masks_by_hand():
    disc = shape_mask("disc", 21, 10.5, 10.5, 5.0, 0.0)
    y, x = np.mgrid[0:21, 0:21] + 0.5
    assert np.array_equal(disc, (x - 10.5) ** 2 + (y - 10.5) ** 2 <= 25)
    square = shape_mask("square", 20, 10, 10, 4, 0.0)  # half side 0.75 * 4 = 3 -> 6x6 pixels
    assert square.sum() == 36


def test_procedural_folder_is_voc_format(tmp_path):
    source = ProceduralScenes(str(tmp_path / "scenes"), counts={"train": 5, "val": 3}, image_size=64)
    source.prepare()
    root = tmp_path / "scenes"
    assert (root / "ImageSets/Segmentation/train.txt").read_text().split() == [
        f"scene-train-{i:06d}" for i in range(5)
    ]
    label_png = Image.open(root / "SegmentationClass/scene-val-000002.png")
    assert label_png.mode == "P" and label_png.getpalette()[:9] == voc_palette()[:9]
    sample = source.dataset()[0]
    assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.uint8
    assert sample["masks"].shape[0] == len(sample["categories"])
    assert sample["prompt"] == "a photograph of a " + " and a ".join(sample["categories"])


def test_real_voc_folder_keeps_the_two_largest_classes(tmp_path):
    labels = np.zeros((8, 8), np.uint8)
    labels[:4, :4] = 12  # dog: 16 px
    labels[4:, :] = 8  # cat: 32 px, one of which becomes "ignore" below
    labels[0, 7] = 15  # person: 1 px
    labels[7, 7] = 255  # ignore
    write_voc_folder(tmp_path / "voc", [], {"train": [("img1", np.zeros((8, 8, 3), np.uint8), labels)]})
    (tmp_path / "voc" / "classes.txt").unlink()  # a plain VOC folder: the 20 VOC classes
    sample = VOCFolder(str(tmp_path / "voc"), image_size=8, splits=["train"]).dataset()[0]
    assert sample["categories"] == ["cat", "dog"]
    assert sample["masks"].sum((1, 2)).tolist() == [31, 16]
    assert sample["prompt"] == "a photograph of a cat and a dog"


def test_missing_voc_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="is not a VOC-format folder"):
        VOCFolder(str(tmp_path / "nope")).prepare()


def test_unknown_categories_name_the_nearest():
    with pytest.raises(UnknownCategoryError, match="'tvmonitr' \\(did you mean 'tvmonitor'"):
        CategorySplit.named("pascal", unseen=["tvmonitr"])
    with pytest.raises(ConfigError, match="Unknown vocabulary 'scene' \\(did you mean 'scenes'"):
        CategorySplit.named("scene")
    split = CategorySplit.named("pascal", split=2)
    assert len(split.seen) == 15 and "sheep" in split.unseen


def test_mask_packing_round_trip():
    masks = torch.rand(2, 13, 7) > 0.5
    bits, shape = pack_masks(masks)
    assert bits.dtype == torch.uint8 and bits.numel() == (2 * 13 * 7 + 7) // 8
    assert torch.equal(unpack_masks(bits, shape), masks)


def write_sample(cache, sample_id, split="train", categories=("disc",)):
    bits, shape = pack_masks(torch.ones(len(categories), 4, 4, dtype=torch.bool))
    tensors = {
        "features.0": torch.randn(3, 2, 2).half(),
        "masks": bits,
        "image": torch.zeros(3, 4, 4, dtype=torch.uint8),
    }
    record = {"id": sample_id, "prompt": "p", "categories": list(categories), "split": split}
    cache.write(record, tensors, {"mask_shape": shape})


def test_cache_is_safetensors_and_json_and_tolerates_a_torn_manifest(tmp_path):
    cache = TripletCache(tmp_path)
    cache.initialise({"storage": "features"})
    write_sample(cache, "a")
    write_sample(cache, "b")
    write_sample(cache, "a")  # a rewrite replaces, never duplicates
    with open(cache.manifest_path, "a") as f:
        f.write('{"id": "c", "pro')  # a line cut off mid-write
    with pytest.warns(UserWarning, match="a torn last line skipped"):
        assert [r["id"] for r in cache.manifest()] == ["a", "b"]
    assert sorted(p.name for p in cache.samples_dir.iterdir()) == ["a.safetensors", "b.safetensors"]
    with pytest.warns(UserWarning, match="removed a torn last line"):
        cache.repair()
    write_sample(cache, "d")
    assert [r["id"] for r in cache.manifest()] == ["a", "b", "d"]
    tensors, metadata = cache.load("a")
    assert tensors["features.0"].dtype == torch.float16 and metadata["mask_shape"] == "1,4,4"
    assert json.loads(cache.metadata_path.read_text())["format_version"] == FORMAT_VERSION


def test_cache_refuses_other_settings_and_names_corrupt_files(tmp_path):
    cache = TripletCache(tmp_path)
    cache.initialise({"storage": "features", "capture_timestep": 81})
    with pytest.raises(CacheError, match="capture_timestep: cache has 81, this run 1"):
        cache.initialise({"storage": "features", "capture_timestep": 1})
    write_sample(cache, "a")
    cache.sample_path("a").write_bytes(b"not a safetensors file")
    with pytest.raises(
        CacheError, match="header too large. The file is missing or damaged: rerun the cache's predict"
    ):
        cache.load("a")
    with pytest.raises(UserError, match=r"sample id '../escape' is not a plain name"):
        write_sample(cache, "../escape")
    assert not (tmp_path / "escape.safetensors").exists()


class FakeTrainer:
    def __init__(self, world_size, rank):
        self.world_size, self.global_rank = world_size, rank


def test_datamodule_splits_and_unrepeated_evaluation_shards(tmp_path):
    cache = TripletCache(tmp_path)
    cache.initialise({"storage": "features"})
    write_sample(cache, "t0", "train", ["disc"])
    write_sample(cache, "t1", "train", ["disc", "ring"])  # ring is unseen in scenes split 1
    for i in range(7):
        write_sample(cache, f"v{i}", "val", ["star"])
    dm = TripletDataModule(str(tmp_path), vocabulary="scenes", split=1, batch_size=2)
    dm.setup("fit")
    assert [r["id"] for r in dm.train_set.records] == ["t0"]  # seen categories only
    batch = next(iter(dm.train_dataloader()))
    assert batch["categories"].tolist() == [[0, -1]] and batch["masks"].shape == (1, 2, 4, 4)
    seen_ids = []
    for rank in range(2):
        dm.trainer = FakeTrainer(2, rank)
        seen_ids += [i for b in dm.val_dataloader() for i in b["id"]]
    assert sorted(seen_ids) == [f"v{i}" for i in range(7)]  # every sample once, none padded


def test_training_order_is_a_one_process_distributed_samplers_whatever_the_global_rng(monkeypatch):
    from torch.utils.data import DistributedSampler

    from grounded_diffusion.data.samplers import EpochShuffle

    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # what seed_everything(7) sets
    data = list(range(50))
    ours, reference = (
        EpochShuffle(data),
        DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=7),
    )
    orders = []
    for epoch in range(3):
        ours.set_epoch(epoch), reference.set_epoch(epoch)
        torch.manual_seed(100 + epoch)  # plays no part
        orders.append(list(ours))
        assert orders[-1] == list(reference)
    assert sorted(orders[0]) == data and orders[0] != orders[1] != orders[2]


def test_iterating_the_loaders_leaves_the_global_rng_alone(tmp_path):
    """Else validating in the middle of training changes what training draws next."""
    cache = TripletCache(tmp_path)
    cache.initialise({"storage": "features"})
    for i in range(5):
        write_sample(cache, f"t{i}", "train", ["disc"])
        write_sample(cache, f"v{i}", "val", ["star"])
    dm = TripletDataModule(str(tmp_path), vocabulary="scenes", split=1, batch_size=2)
    dm.setup("fit")
    before = torch.get_rng_state()
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert len(list(loader)) == 3
    assert torch.equal(torch.get_rng_state(), before)


def test_datamodule_names_an_empty_split(tmp_path):
    cache = TripletCache(tmp_path)
    cache.initialise({"storage": "features"})
    write_sample(cache, "t0", "train", ["disc"])
    dm = TripletDataModule(str(tmp_path), vocabulary="scenes", split=1)
    with pytest.raises(ValueError, match="no samples for split val; it has splits \\['train'\\]"):
        dm.setup("test")


def test_cache_images_are_compressed_and_format_2_caches_still_read(tmp_path):
    from PIL import Image as PILImage

    from grounded_diffusion.data.cache import decode_image, encode_image

    photo = PILImage.open(
        next(Path(matplotlib.get_data_path()).glob("sample_data/grace_hopper.jpg"))
    ).convert("RGB")
    image = torch.from_numpy(np.array(photo.resize((128, 128)))).permute(2, 0, 1).contiguous()
    key, png = encode_image(image, "png")
    assert key == "image.png" and torch.equal(decode_image({key: png}), image)  # lossless
    key, jpeg = encode_image(image, "jpeg", quality=90)
    assert key == "image.jpeg" and jpeg.numel() < png.numel() / 2
    assert (decode_image({key: jpeg}).float() - image.float()).abs().mean() < 4  # lossy, close
    # A format-2 sample (raw image) reads as before.
    cache = TripletCache(tmp_path)
    cache.initialise({"storage": "features"})
    write_sample(cache, "old")
    sample = TripletSamples(cache, cache.manifest(), CategorySplit(SCENES), 2)[0]
    assert torch.equal(sample["image"], torch.zeros(3, 4, 4, dtype=torch.uint8))


def test_building_into_a_cache_of_an_older_format_says_to_rebuild(tmp_path):
    (tmp_path / "cache.json").write_text(json.dumps({"format_version": 2, "storage": "latents"}))
    with pytest.raises(
        CacheError, match="format_version: cache has 2, this run 3.*delete this one to rebuild it"
    ):
        TripletCache(tmp_path).initialise({"storage": "latents"})
