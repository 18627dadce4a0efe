"""The Python API (``GroundedGenerator``), the portable head folder and the demo page, on a head
fitted for a few steps on the tiny random SD (experiments/scenes.yaml). The shapes-world head
(segmentation quality, the README example) is tested in test_world_protocol1.py."""

from __future__ import annotations

import filecmp
import json
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, scenes_args
from grounded_diffusion import GroundedGenerator, PretrainedHead
from grounded_diffusion.cli import main
from grounded_diffusion.errors import ConfigError, UserError
from grounded_diffusion.models.backbones import BackboneConfig, StableDiffusionBackbone, build_backbone
from grounded_diffusion.models.pretrained_head import CONFIG_NAME, WEIGHTS_NAME, HeadFolderError

pytestmark = pytest.mark.workflow  # runs the CLI or a whole workflow: `make test`, not `make test-fast`

PROMPTS = [
    {"prompt": "a photograph of a dog and a cat", "categories": ["dog", "cat"]},
    {"prompt": "a photograph of a car", "categories": ["car"]},
    {"prompt": "a photograph of a cat on a sofa", "categories": ["cat", "sofa"]},
]


@pytest.fixture(scope="module")
def head_checkpoint(scene_cache, tmp_path_factory) -> Path:
    """A GroundingModule fit (3 steps) on the session's scene cache: its last.ckpt."""
    root = tmp_path_factory.mktemp("api-head")
    cache = next(scene_cache.glob("cache-*"))
    main(
        [
            "fit",
            *scenes_args(root, steps=3),
            "--data.init_args.cache_dir",
            str(cache),
            "--trainer.logger",
            "false",
        ]
    )
    return root / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def generator(head_checkpoint) -> GroundedGenerator:
    return GroundedGenerator.from_checkpoint(head_checkpoint)


def test_head_folder_round_trip_keeps_weights_and_settings(head_checkpoint, tmp_path):
    head = PretrainedHead.from_checkpoint(head_checkpoint)
    folder = head.save_pretrained(tmp_path / "head")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]  # no pickle
    again = PretrainedHead.from_pretrained(folder)
    assert again.config() == head.config()
    ours, theirs = head.head.state_dict(), again.head.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # What fit trained: the checkpoint's own weights and the scenes config's settings.
    trained = torch.load(head_checkpoint, map_location="cpu", weights_only=True)
    assert all(torch.equal(v, trained["state_dict"][f"head.{k}"]) for k, v in theirs.items())
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["backbone"]["model_id"] == "embedded/tiny-sd" and config["head"]["embed_dim"] == 128
    assert config["backbone"]["capture_step"] == trained["hyper_parameters"]["backbone"]["capture_step"]


def test_api_results_equal_the_cli_predict_outputs_file_for_file(head_checkpoint, generator, tmp_path):
    """experiments/generate.yaml with a PromptList (seed 3) and the API with seed=3 and the same
    batch size write the same folder: images, label maps, overlays, COCO JSON, manifest."""
    prompts = {
        "class_path": "grounded_diffusion.data.prompts.PromptList",
        "init_args": {"file": None, "seed": 3, "prompts": PROMPTS},
    }
    cli = tmp_path / "cli"
    main(
        [
            "predict",
            "--config",
            str(REPO / "experiments/generate.yaml"),
            "--config",
            str(REPO / "experiments/offline.yaml"),
            "--ckpt_path",
            str(head_checkpoint),
            "--trainer.default_root_dir",
            str(cli),
            "--trainer.enable_progress_bar",
            "false",
            "--data.init_args.batch_size",
            "2",
            "--data.init_args.prompts",
            json.dumps(prompts),
        ]
    )
    out = generator(
        [p["prompt"] for p in PROMPTS],
        [p["categories"] for p in PROMPTS],
        seed=3,
        batch_size=2,
        progress=False,
    )
    api = out.save(tmp_path / "api")
    files = sorted(
        p.relative_to(cli)
        for p in cli.rglob("*")
        if p.is_file() and p.name not in ("config-predict.yaml", ".lock")
    )
    # 3 images x (image, label map, overlay) + classes, label format, manifest, COCO, image set
    assert len(files) == 3 * 3 + 5
    assert [f for f in files if not filecmp.cmp(cli / f, api / f, shallow=False)] == []
    assert [tuple(p.shape) for p in out.probabilities] == [(2, 128, 128), (1, 128, 128), (2, 128, 128)]
    assert all(p.std() > 0 for p in out.probabilities)  # maps, not constants


def test_export_verb_writes_the_head_folder_the_generator_loads(head_checkpoint, generator, tmp_path, capsys):
    main(["export", "--ckpt_path", str(head_checkpoint), "--out", str(tmp_path / "head")])
    assert f"-> {tmp_path / 'head'}" in capsys.readouterr().out
    loaded = GroundedGenerator.from_pretrained(tmp_path / "head")
    a = loaded("a photograph of a dog", ["dog", "grass"], seed=1, progress=False)
    b = generator("a photograph of a dog", ["dog", "grass"], seed=1, progress=False)
    assert torch.equal(a.probabilities[0], b.probabilities[0])
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_push_to_hub_uploads_the_saved_folder(generator, tmp_path, monkeypatch):
    """Offline, the Hub is replaced by a recorder; what it receives must load as the head."""
    import huggingface_hub

    received = {}

    class RecordingApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
            received["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):
            shutil.copytree(folder_path, tmp_path / "uploaded")
            return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    assert generator.push_to_hub("me/my-head", private=True) == "https://huggingface.co/me/my-head"
    assert received["repo"] == ("me/my-head", True, True)
    assert PretrainedHead.from_pretrained(tmp_path / "uploaded").config() == generator.pretrained.config()


def test_segment_takes_any_size_and_maps_masks_back(generator, tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)
    native = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    out = generator.segment(
        [tmp_path / "wide.png", torch.from_numpy(native).permute(2, 0, 1)], ["dog", "cat"], progress=False
    )
    assert [tuple(p.shape) for p in out.probabilities] == [(2, 70, 100), (2, 128, 128)]
    assert out.prompts == ["a photograph of a dog and a cat"] * 2
    # At the model's own size nothing is resized: the masks are the head's on the image itself.
    alone = generator.segment(Image.fromarray(native), ["dog", "cat"], seed=0, progress=False)
    assert not torch.equal(
        alone.probabilities[0], out.probabilities[1]
    )  # image 1 draws other noise than image 0
    again = generator.segment(
        [Image.fromarray(wide), Image.fromarray(native)], ["dog", "cat"], progress=False
    )
    assert torch.equal(again.probabilities[1], out.probabilities[1])
    inverted = generator.segment(native, [["dog"]], mode="ddim_inversion", progress=False)
    assert tuple(inverted.probabilities[0].shape) == (1, 128, 128)


def test_overlays_draw_the_masks_with_a_legend(generator):
    out = generator("a photograph of a dog and a cat", ["dog", "cat"], seed=0, progress=False)
    drawn = out.overlays()[0]
    assert (
        drawn.width == 256 and drawn.height == 256 + 2 * 16 + 4
    )  # enlarged x2, one legend line per category
    labels = out.label_maps()[0]
    assert set(np.unique(labels)) <= {0, 1, 2}


# -- clear errors, before any work ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("categories", "message"),
    [
        ([], "no category names given"),
        ([[]], "no category names given"),
        (["dog", ""], "category '' has no token the text encoder knows"),
        ("dog", "categories is the string 'dog'"),
        (["dog", "dog"], "name one category twice"),
        ([["dog"], ["cat"]], "one list per prompt (1); got 2 entries"),
        (["x " * 80], "more than the 71 that fit"),
    ],
)
def test_bad_categories_are_named(generator, categories, message):
    with pytest.raises(ConfigError, match=None) as error:
        generator("a photograph of a dog", categories, progress=False)
    assert message in str(error.value)


def test_steps_that_skip_the_capture_timestep_are_refused_with_the_valid_ones(generator):
    with pytest.raises(ConfigError, match=r"num_inference_steps=33: no step .* use one of \[25, 48, 49, 50"):
        generator("a photograph of a dog", ["dog"], num_inference_steps=33, progress=False)
    assert generator.backbone.capture_step_for(25) == 3  # 25 steps pass the same timestep, at step 3


def test_unreadable_and_unusable_images_are_named(generator, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cases = [
        (broken, "images[0]: cannot read"),
        (tmp_path / "missing.png", "does not exist"),
        (np.zeros((64, 64, 3), dtype=np.float32), "float32 array of shape [64, 64, 3]; give uint8 RGB"),
        (np.zeros((8, 64, 3), dtype=np.uint8), "is 64x8, under 16 pixels a side"),
    ]
    for image, message in cases:
        with pytest.raises(UserError) as error:
            generator.segment([image], ["dog"], progress=False)
        assert message in str(error.value)


def test_a_head_for_another_backbone_or_capture_step_is_refused(head_checkpoint):
    refused = pytest.raises(
        ConfigError,
        match="this head was trained on embedded/tiny-sd .* but the backbone embedded/tiny-sdxl gives",
    )
    with pytest.warns(UserWarning, match="it must hold the same weights"), refused:
        GroundedGenerator.from_checkpoint(head_checkpoint, model_id="embedded/tiny-sdxl")
    head = PretrainedHead.from_checkpoint(head_checkpoint)
    other_step = StableDiffusionBackbone(BackboneConfig(capture_step=head.backbone.capture_step + 1))
    with pytest.raises(ConfigError, match="captured otherwise .*capture timestep: head 81, backbone 101"):
        GroundedGenerator(other_step, head)


def test_bad_head_folders_are_named(head_checkpoint, tmp_path):
    head = PretrainedHead.from_checkpoint(head_checkpoint)
    cases = {
        "missing": (lambda f: None, "does not exist"),
        "empty": (lambda f: f.mkdir(), f"holds no {CONFIG_NAME}"),
        "torn": (
            lambda f: (head.save_pretrained(f), (f / WEIGHTS_NAME).write_bytes(b"\x00" * 9)),
            "cannot be read",
        ),
        "newer": (
            lambda f: (head.save_pretrained(f), _edit(f, format_version=99)),
            "upgrade grounded-diffusion",
        ),
        "other": (
            lambda f: (head.save_pretrained(f), _edit(f, format="diffusers")),
            "not a grounding head's config",
        ),
        "widths": (
            lambda f: (head.save_pretrained(f), _edit(f, head={**head.config()["head"], "embed_dim": 64})),
            "do not fit its config",
        ),
    }
    for name, (make, message) in cases.items():
        folder = tmp_path / name
        make(folder)
        with pytest.raises(HeadFolderError) as error:
            PretrainedHead.from_pretrained(folder)
        assert message in str(error.value), name


def _edit(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, **changes}))


def test_a_hub_id_that_cannot_be_downloaded_is_one_line():
    with pytest.raises(
        HeadFolderError, match="'someone/no-such-head' is neither a local folder nor a Hub repository"
    ):
        PretrainedHead.from_pretrained("someone/no-such-head")


def test_export_of_a_bad_checkpoint_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--ckpt_path", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "head")])
    assert str(exit_.value).startswith(f"error: checkpoint {tmp_path / 'none.ckpt'} does not exist")
    segmenter = {
        "hyper_parameters": {"_class_path": "lightning_modules.segmentation.SemanticSegmentationModule"},
        "state_dict": {},
        "pytorch-lightning_version": "2.6.0",
    }
    torch.save(segmenter, tmp_path / "segmenter.ckpt")
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--ckpt_path", str(tmp_path / "segmenter.ckpt"), "--out", str(tmp_path / "head")])
    assert "is of a Protocol II segmenter" in str(exit_.value)
    assert not (tmp_path / "head").exists()


# -- the demo page -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(generator):
    from grounded_diffusion.demo import build_demo

    demo = build_demo(generator)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def mask_pixels(annotation: dict) -> np.ndarray:
    """A mask as gr.AnnotatedImage sends it: an RGBA PNG whose alpha is the mask."""
    return np.asarray(Image.open(annotation["image"]))[..., 3] == 255


def test_demo_predictions_agree_with_the_python_api(demo_url, generator, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(demo_url, verbose=False)
    result = client.predict("a photograph of a dog and a cat", "dog, cat", 4, 25, api_name="/generate")[
        "value"
    ]
    expected = generator(
        "a photograph of a dog and a cat", ["dog", "cat"], seed=4, num_inference_steps=25, progress=False
    )
    assert [a["label"] for a in result["annotations"]] == ["dog", "cat"]
    labels = expected.label_maps()[0]  # the demo shows each pixel's winning category
    for k, annotation in enumerate(result["annotations"]):
        assert np.array_equal(mask_pixels(annotation), labels == k + 1)
    assert (labels > 0).any()
    assert np.array_equal(
        np.asarray(Image.open(result["image"]).convert("RGB")), np.asarray(expected.images[0])
    )

    image = np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "upload.png")
    result = client.predict(
        handle_file(str(tmp_path / "upload.png")), "car", "", "noise", api_name="/segment"
    )["value"]
    expected = generator.segment(image, ["car"], progress=False)
    assert np.array_equal(mask_pixels(result["annotations"][0]), expected.label_maps()[0] == 1)

    # the training-free baseline beside the head (on a UNet: DAAM)
    result = client.predict(
        "a photograph of a dog and a cat", "dog, cat", 4, 25, "daam", api_name="/generate"
    )["value"]
    expected = generator(
        "a photograph of a dog and a cat",
        ["dog", "cat"],
        seed=4,
        num_inference_steps=25,
        progress=False,
        method="daam",
    )
    labels = expected.label_maps()[0]
    for k, annotation in enumerate(result["annotations"]):
        assert np.array_equal(mask_pixels(annotation), labels == k + 1)


def test_demo_says_what_is_wrong_with_an_input(demo_url, tmp_path):
    """Each reason on the page in one line (gr.Error), not Gradio's "upstream app raised an exception"."""
    from gradio_client import Client, handle_file

    client = Client(demo_url, verbose=False)
    with pytest.raises(Exception, match="no category names given"):
        client.predict("a dog", " , ", 0, 50, api_name="/generate")
    with pytest.raises(Exception, match="The seed is empty: enter a whole number"):  # a cleared seed box
        client.predict("a dog", "dog", None, 50, api_name="/generate")
    (tmp_path / "notes.txt").write_text("not an image\n")
    with pytest.raises(
        Exception, match=r"notes.txt cannot be read as an image \(.*\): upload a PNG, JPEG or WebP"
    ):
        client.predict(handle_file(str(tmp_path / "notes.txt")), "dog", "", "noise", api_name="/segment")


def test_demo_takes_300_names(demo_url):
    from gradio_client import Client

    names = ", ".join(f"thing {i}" for i in range(300))
    result = Client(demo_url, verbose=False).predict("things", names, 0, 50, api_name="/generate")["value"]
    assert [a["label"] for a in result["annotations"]] == [f"thing {i}" for i in range(300)]


def test_demo_page_renders_in_headless_chromium(demo_url, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-sync",
        "--disable-background-networking",
        "--disable-component-update",
        "--virtual-time-budget=20000",
    ]
    screenshot = tmp_path / "demo.png"
    run = [chromium, *flags, f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run(
        [*run, "--window-size=1280,900", f"--screenshot={screenshot}", demo_url],
        capture_output=True,
        timeout=180,
        check=True,
    )
    dom = subprocess.run(
        [*run, "--dump-dom", demo_url], capture_output=True, text=True, timeout=180, check=True
    ).stdout
    # The app mounted (Gradio builds the page in JavaScript): its title, both tabs, the controls
    # and the example's legend are in the rendered DOM.
    for text in (
        "Grounded diffusion",
        "Segment an image",
        "Categories (comma-separated)",
        "Steps",
        ">dog<",
        ">cat<",
    ):
        assert text in dom, text
    shot = np.asarray(Image.open(screenshot).convert("RGB"))
    assert shot.shape == (900, 1280, 3)
    assert (
        len(np.unique(shot.reshape(-1, 3), axis=0)) > 1000
    )  # a drawn page with the example image, not a blank one


@pytest.mark.parametrize(
    "model_id",
    [
        "embedded/tiny-sd2",
        "embedded/tiny-sdxl",
        "embedded/tiny-sd3",
        "embedded/tiny-flux",
        "embedded/tiny-flux2",
        "embedded/tiny-flux2-dev",
    ],
)
def test_generation_and_segmentation_run_on_every_backbone(model_id, tmp_path):
    """SD-2.x (v-prediction), SDXL (two text encoders, pooled text), SD3, FLUX.1 and FLUX.2
    [klein] and [dev] (diffusion transformers): a head built for the backbone, saved and loaded, generates and segments at the
    backbone's own size."""
    from grounded_diffusion.models.grounding_head import GroundingHead, HeadConfig

    length = 160 if model_id.endswith("dev") else 16  # (FLUX.2 [dev]: its system message first)
    dit = (
        {"image_size": 128, "max_sequence_length": length} if "sd3" in model_id or "flux" in model_id else {}
    )
    config = BackboneConfig(model_id=model_id, num_inference_steps=4, capture_step=2, **dit)
    backbone = build_backbone(config)
    head = GroundingHead(
        backbone.feature_channels(),
        backbone.text_dim,
        HeadConfig(
            group_channels=[8] * len(backbone.feature_channels()), embed_dim=32, num_heads=4, ffn_dim=64
        ),
    )
    PretrainedHead(head, config, guidance_scale=5.0).save_pretrained(tmp_path / "head")
    generator = GroundedGenerator.from_pretrained(tmp_path / "head")
    side = generator.backbone.image_size
    out = generator(
        ["a photograph of a dog", "a photograph of a cat and a dog"],
        [["dog"], ["cat", "dog"]],
        progress=False,
    )
    assert [tuple(p.shape) for p in out.probabilities] == [(1, side, side), (2, side, side)]
    seg = generator.segment(np.zeros((40, 50, 3), dtype=np.uint8), ["dog"], progress=False)
    assert tuple(seg.probabilities[0].shape) == (1, 40, 50)


def test_training_free_methods_through_the_api_on_a_diffusion_transformer(tmp_path):
    """``method=``: ConceptAttention's argmax masks and joint attention's normalised maps of the
    generation, as computed from the backbone's own maps of the same seeds; real images too."""
    from grounded_diffusion.models.concept_attention import argmax_masks
    from grounded_diffusion.models.daam import normalized_heat_maps
    from grounded_diffusion.models.grounding_head import GroundingHead, HeadConfig

    config = BackboneConfig(
        model_id="embedded/tiny-sd3",
        num_inference_steps=4,
        capture_step=2,
        image_size=128,
        max_sequence_length=16,
    )
    backbone = build_backbone(config)
    channels = backbone.feature_channels()
    small = HeadConfig(group_channels=[8] * len(channels), embed_dim=32, num_heads=4, ffn_dim=64)
    head = GroundingHead(channels, backbone.text_dim, small)
    PretrainedHead(head, config, guidance_scale=5.0).save_pretrained(tmp_path / "head")
    generator = GroundedGenerator.from_pretrained(tmp_path / "head")
    prompts, categories = ["a photograph of a cat and a dog"], [["cat", "dog"]]
    concept = generator(prompts, categories, method="concept_attention", progress=False)
    reference = generator.backbone.generate(prompts, concept.seeds, 5.0, categories)
    expected = argmax_masks(reference.concept_maps, (128, 128))[0]
    assert torch.equal(concept.masks[0], expected) and concept.probabilities[0].shape == (2, 128, 128)
    joint = generator(prompts, categories, method="joint_attention", threshold=0.3, progress=False)
    torch.testing.assert_close(
        joint.probabilities[0], normalized_heat_maps(reference.heat_maps, (128, 128))[0]
    )
    assert torch.equal(joint.masks[0], joint.probabilities[0] >= 0.3)
    real = generator.segment(
        np.zeros((40, 50, 3), dtype=np.uint8), ["dog"], method="concept_attention", progress=False
    )
    assert tuple(real.probabilities[0].shape) == (1, 40, 50)
    with pytest.raises(ConfigError, match="method 'daam' is not one of"):
        generator(prompts, categories, method="daam", progress=False)
    with pytest.raises(ConfigError, match="threshold is a training-free method's τ"):
        generator(prompts, categories, threshold=0.3, progress=False)


def test_concept_attention_on_a_unet_is_refused_in_one_line(generator):
    with pytest.raises(ConfigError, match="ConceptAttention runs on diffusion transformers") as error:
        generator(["a photograph of a dog"], ["dog"], method="concept_attention", progress=False)
    assert "\n" not in str(error.value)
    daam = generator(["a photograph of a dog"], ["dog"], method="daam", progress=False)
    assert daam.mask_threshold == 0.4 and float(daam.probabilities[0].max()) == pytest.approx(1.0, abs=1e-4)
