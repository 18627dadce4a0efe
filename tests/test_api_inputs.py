"""What a Python user passes the API and what a head folder may hold: numpy integers and integral
floats are taken, anything else is one line before any work; a damaged head config.json is one
line per field; more than 254 category names are written as 16-bit label maps, not wrapped.

The generator here is the tiny random SD with an untrained head (built in memory): these tests
check inputs and files, not masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from grounded_diffusion import GroundedGenerator, PretrainedHead
from grounded_diffusion.api import GroundedImages
from grounded_diffusion.data.grounded_folder import GroundedImageFolder, label_format
from grounded_diffusion.data.segmentation_sets import FolderSegmentationSet
from grounded_diffusion.data.voc import PALETTE_RGB, VOCFolder
from grounded_diffusion.demo import annotation
from grounded_diffusion.errors import ConfigError, UserError
from grounded_diffusion.models.backbones import BackboneConfig, build_backbone
from grounded_diffusion.models.grounding_head import GroundingHead, HeadConfig
from grounded_diffusion.models.pretrained_head import CONFIG_NAME, HeadFolderError

HEAD = HeadConfig(group_channels=[8, 8, 8, 8], embed_dim=32, num_layers=1, num_heads=4, ffn_dim=64)


@pytest.fixture(scope="module")
def generator() -> GroundedGenerator:
    config = BackboneConfig(num_inference_steps=10, capture_step=2)
    backbone = build_backbone(config)
    torch.manual_seed(0)
    head = GroundingHead(backbone.feature_channels(), backbone.text_dim, HEAD)
    return GroundedGenerator(backbone, PretrainedHead(head.eval(), config, guidance_scale=4.0))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, UserError), message
    return message


# -- values a Python user passes -------------------------------------------------------------------


def test_numpy_integers_and_integral_floats_are_taken_as_whole_numbers(generator):
    plain = generator("a photograph of a disc", ["disc"], seed=3, num_inference_steps=10, progress=False)
    numpy = generator(
        "a photograph of a disc", ["disc"], seed=np.int64(3), num_inference_steps=10.0, progress=False
    )
    assert plain.seeds == numpy.seeds
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(numpy.images[0]))
    assert torch.equal(plain.probabilities[0], numpy.probabilities[0])
    listed = generator(
        ["a photograph of a disc"] * 2, [["disc"], ["ring"]], seed=np.array([5, 6]), progress=False
    )
    assert listed.seeds == [5, 6]


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"categories": None}, "categories is None"),
        ({"categories": [1, 2]}, "categories holds 1 (int)"),
        (
            {"prompts": ["a disc", "a ring"], "categories": [["disc"], [2]]},
            "categories of prompt 1 holds 2 (int)",
        ),
        (
            {"prompts": ["a disc", "a ring"], "categories": [["disc"]]},
            "or one list per prompt (2); got 1 entries",
        ),
        ({"categories": 5}, "categories is 5 (int)"),
        ({"num_inference_steps": 0}, "num_inference_steps is 0, outside [1, inf]"),
        ({"num_inference_steps": 12.5}, "num_inference_steps is 12.5, not a whole number"),
        ({"num_inference_steps": "50"}, "num_inference_steps is '50', not a whole number"),
        ({"seed": -1}, "seed is -1, outside [0, inf]"),
        ({"seed": "3"}, "seed is '3', not a whole number"),
        ({"seed": [1, "x"]}, "seed[1] is 'x', not a whole number"),
        ({"seed": 2.5}, "seed is 2.5, not a whole number"),
        ({"guidance_scale": float("nan")}, "guidance_scale is nan, not a finite number"),
        ({"batch_size": 0}, "batch_size is 0, outside [1, inf]"),
        ({"prompts": None}, "prompts must be a text or a non-empty list of texts"),
        ({"prompts": [3]}, "prompts must be a text or a non-empty list of texts"),
    ],
)
def test_values_that_are_not_what_a_call_takes_are_one_line(generator, kwargs, expected):
    call = {"prompts": "a photograph of a disc", "categories": ["disc"], "progress": False, **kwargs}
    with pytest.raises(ConfigError) as error:
        generator(call.pop("prompts"), call.pop("categories"), **call)
    assert expected in one_line(error)


def test_segment_refuses_what_is_not_an_image_list_in_one_line(generator):
    for images, expected in [(None, "images is a NoneType"), ([], "images is empty"), (7, "images is a int")]:
        with pytest.raises(UserError) as error:
            generator.segment(images, ["disc"], progress=False)
        assert expected in one_line(error)
    with pytest.raises(ConfigError) as error:
        generator.segment(np.zeros((32, 32, 3), np.uint8), ["disc"], seed=1.5, progress=False)
    assert "seed is 1.5, not a whole number" in one_line(error)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"device": "tpu9"}, "device 'tpu9' is not a torch device"),
        ({"device": "cuda:7"}, "device 'cuda:7'"),
        ({"dtype": "float8"}, "dtype 'float8' is not one of ('float32', 'float16', 'bfloat16')"),
        ({"dtype": torch.int8}, "dtype 'torch.int8' is not one of"),
    ],
)
def test_a_device_or_dtype_that_does_not_exist_is_one_line(generator, tmp_path, kwargs, expected):
    folder = generator.save_pretrained(tmp_path / "head")
    with pytest.raises(ConfigError) as error:
        GroundedGenerator.from_pretrained(folder, **kwargs)
    assert expected in one_line(error)


# -- a head folder's config.json, field by field ----------------------------------------------------


@pytest.mark.parametrize(
    "edit, expected",
    [
        ({"head": {"num_heads": 5}}, "head.embed_dim 32 is not divisible by num_heads 5"),
        ({"head": {"embed_dim": -8}}, "head.embed_dim is -8, outside [1, inf]"),
        ({"head": {"group_channels": "wide"}}, "head.group_channels is 'wide'"),
        ({"format_version": "2"}, "format_version is '2', not a version number"),
        ({"format_version": 0}, "format_version is 0, not a version number"),
        ({"mask_threshold": 2.0}, "mask_threshold is 2.0, outside [0.0, 1.0]"),
        ({"guidance_scale": "high"}, "guidance_scale is 'high', not a finite number"),
        ({"text_dim": 0}, "text_dim is 0, outside [1, inf]"),
        ({"feature_channels": []}, "feature_channels is [], not a list of widths"),
        ({"feature_channels": [8, "x"]}, "feature_channels is 'x', not a whole number"),
        ({"real_image_mode": "nois"}, "real_image_mode 'nois' is not one of"),
        ({"backbone": {"capture_step": 99}}, "backbone.capture_step is 99, outside [1, 10]"),
        ({"backbone": "tiny"}, "backbone is 'tiny', not a set of fields"),
        ({"head": {"embed_width": 8}}, "lacks or misnames a field"),
    ],
)
def test_damaged_head_config_values_are_one_line_naming_the_field(generator, tmp_path, edit, expected):
    folder = generator.save_pretrained(tmp_path / "head")
    config = json.loads((folder / CONFIG_NAME).read_text())
    for key, value in edit.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(HeadFolderError) as error:
        PretrainedHead.from_pretrained(folder)
    message = one_line(error)
    assert str(folder / CONFIG_NAME) in message and expected in message


# -- more names than 8-bit labels hold ------------------------------------------------------------


def many_names(count: int) -> list[str]:
    return [f"thing {i}" for i in range(count)]


def test_more_than_254_names_give_16_bit_label_maps_and_folders(tmp_path):
    """300 images, each with one new name (the issue's case): name k is label k + 1, in memory
    and on disk, not label (k + 1) mod 256."""
    names, size = many_names(300), 16
    probabilities = [torch.full((1, size, size), 0.9) for _ in names]
    images = [Image.new("RGB", (size, size), (i % 256, 0, 0)) for i in range(len(names))]
    result = GroundedImages(images, [[n] for n in names], probabilities, ["a photo"] * 300, list(range(300)))
    maps = result.label_maps()
    assert maps[299].dtype == np.uint16 and (maps[299] == 300).all() and (maps[43] == 44).all()
    folder = result.save(tmp_path / "grounded")
    assert (
        json.loads((folder / "labels.json").read_text())
        == label_format(300)
        == {
            "bits": 16,
            "png": "grayscale",
            "background": 0,
            "ignore": 65535,
        }
    )
    record = json.loads((folder / "manifest.jsonl").read_text().splitlines()[299])
    label_png = Image.open(folder / "SegmentationClass" / f"{record['id']}.png")
    assert label_png.mode == "I;16" and (np.asarray(label_png) == 300).all()
    assert GroundedImageFolder(folder).classes() == names
    # Own-data triplets read 16-bit maps (65535 ignore); Protocol II segmenters (8-bit) refuse them.
    source = VOCFolder(str(folder), splits=["images"], image_size=size)
    source.prepare()
    sample = source.dataset().__getitem__(299)
    assert sample["categories"] == ["thing 299"]
    with pytest.raises(ConfigError, match="300 classes in 16-bit label maps"):
        FolderSegmentationSet(str(folder), split="images")
    result.overlays()  # every label has a colour of its own
    assert len({tuple(c) for c in PALETTE_RGB[1:301].tolist()}) == 300


def test_up_to_254_names_stay_8_bit_voc_palette_maps(tmp_path):
    names = many_names(254)
    probabilities = torch.linspace(0.6, 0.9, 254)[:, None, None].expand(254, 16, 16)  # the last wins
    result = GroundedImages([Image.new("RGB", (16, 16))], [names], [probabilities], ["a photo"], [0])
    labels = result.label_maps()[0]
    assert labels.dtype == np.uint8 and (labels == 254).all()
    folder = result.save(tmp_path / "grounded")
    label_png = Image.open(next((folder / "SegmentationClass").glob("*.png")))
    assert label_png.mode == "P" and (np.asarray(label_png) == 254).all()
    assert json.loads((folder / "labels.json").read_text())["bits"] == 8


def test_generation_and_the_demo_take_300_names_at_once(generator, tmp_path):
    names = many_names(300)
    result = generator("a photograph of things", names, seed=0, num_inference_steps=10, progress=False)
    assert result.probabilities[0].shape[0] == 300 and result.label_maps()[0].dtype == np.uint16
    (_, masks), colours = annotation(result)
    assert len(masks) == 300 and len(set(colours.values())) == 300
    result.save(tmp_path / "out")
    with pytest.raises(ConfigError) as error:
        GroundedImages([], [many_names(70000)], [], [], []).save(tmp_path / "too-many")
    assert "70000 classes: label maps hold at most 65534" in one_line(error)
