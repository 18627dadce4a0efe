"""Bad input and set-up: one line that names the bad value and the fix, before any work; and
the library noise a run used to print is gone."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import REPO, scenes_args
from grounded_diffusion import launch, lightning_entry, reports
from grounded_diffusion.cli import main
from grounded_diffusion.data.cache import TripletCache
from grounded_diffusion.data.manifest import JsonlManifest
from grounded_diffusion.data.segmentation_sets import FolderSegmentationSet
from grounded_diffusion.data.validation import DataError
from grounded_diffusion.data.voc import VOCFolder, write_voc_folder
from grounded_diffusion.errors import UserError
from protocol2_data import rectangle_image

pytestmark = pytest.mark.workflow  # runs the CLI or a whole workflow: `make test`, not `make test-fast`

P2 = REPO / "experiments" / "protocol2"


def cli_error(args: list[str], capsys) -> str:
    """The one line a CLI run exits with; nothing else may reach stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert "usage:" not in capsys.readouterr().err
    return message


# -- config keys and class paths -------------------------------------------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            ["--trainer.max_stepz", "5"],
            "fit: unknown key 'trainer.max_stepz' (did you mean 'trainer.max_steps'?)",
        ),
        (
            ["--model.init_args.lrr", "3"],
            "model.init_args.lrr: lightning_modules.grounding.GroundingModule has no argument 'lrr' (did you mean 'lr'?)",
        ),
        (
            ["--model.init_args.head.embed_dimm", "3"],
            "has no argument 'head.embed_dimm' (did you mean 'head.embed_dim'?)",
        ),
        (
            ["--data", "datamodules.triplets.TripletDataModul"],
            "data: no class 'datamodules.triplets.TripletDataModul' (did you mean 'datamodules.triplets.TripletDataModule'?)",
        ),
        (
            ["--data.init_args.batch_size", "abc"],
            "data.init_args.batch_size: Expected a <class 'int'>. Got value: abc",
        ),
    ],
)
def test_misspelled_keys_and_classes_name_the_nearest_valid_one(override, expected, tmp_path, capsys):
    assert expected in cli_error(["fit", *scenes_args(tmp_path), *override], capsys)
    assert not list(tmp_path.iterdir())


def test_misspelled_key_in_a_config_file(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("trainer:\n  max_step: 4\n")
    message = cli_error(["fit", *scenes_args(tmp_path), "--config", str(tmp_path / "bad.yaml")], capsys)
    assert "unknown key 'trainer.max_step' (did you mean 'trainer.max_steps'?)" in message


def test_version_and_the_lightning_script(capsys, monkeypatch):
    lightning_entry.main(["--version"])
    assert capsys.readouterr().out.startswith("grounded-diffusion 0.1.0 (lightning 2.")
    # sys.argv holding the same arguments that the script passes on: no args+argv warning
    monkeypatch.setattr(
        "sys.argv", ["lightning", "fit", "--config", str(REPO / "experiments/scenes.yaml"), "--print_config"]
    )
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit):
        warnings.simplefilter("always")
        lightning_entry.main()
    assert not [w for w in caught if "args parameter is intended" in str(w.message)]


def test_print_config_is_resolved(capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "predict",
                "--config",
                str(REPO / "experiments/generate.yaml"),
                "--config",
                str(REPO / "experiments/offline.yaml"),
                "--print_config",
            ]
        )
    printed = capsys.readouterr().out
    assert "${" not in printed and "default_root_dir: outputs/offline/prompts-splitall" in printed


# -- caches, manifests, weights --------------------------------------------------------------


def test_manifest_line_without_id(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"id": "a"}\n{"prompt": "x"}\n')
    with pytest.raises(
        UserError, match=r"manifest.jsonl:2: the line is not a sample's record .*delete that line"
    ):
        JsonlManifest(manifest).records()


def test_truncated_cache_json(scene_cache, tmp_path, capsys):
    cache = next(scene_cache.glob("cache-*"))
    broken = tmp_path / "cache"
    broken.mkdir()
    (broken / "cache.json").write_text((cache / "cache.json").read_text()[:40])
    message = cli_error(["fit", *scenes_args(scene_cache), "--data.init_args.cache_dir", str(broken)], capsys)
    assert (
        f"{broken / 'cache.json'} is not valid JSON" in message
        and "Delete it and rerun the cache's predict command" in message
    )


def test_missing_cache_names_the_configs_that_build_it(tmp_path, capsys):
    args = [
        "fit",
        "--config",
        str(REPO / "experiments/pascal_split1.yaml"),
        "--config",
        str(REPO / "experiments/offline.yaml"),
        "--data.init_args.cache_dir",
        str(tmp_path / "nothing"),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger",
        "false",
    ]
    message = cli_error(args, capsys)
    assert "experiments/synth/<name>_train.yaml" in message and "no data.init_args.source" in message


def test_cache_samples_without_files_stop_fit_and_predict_rebuilds_them(tmp_path, capsys):
    args = scenes_args(tmp_path, counts="{train: 6, val: 2, test: 2}")
    main(["predict", *args])
    cache = TripletCache(next(tmp_path.glob("cache-*")))
    cache.sample_path("scene-val-000001").unlink()
    message = cli_error(["fit", *args], capsys)
    assert "lists 1 samples without a file (first:" in message and "scene-val-000001.safetensors" in message
    with pytest.warns(UserWarning, match="1 listed samples have no file; rebuilding them"):
        main(["predict", *args])
    assert cache.sample_path("scene-val-000001").exists() and len(cache.manifest()) == 10


def test_local_model_folder_that_does_not_exist(tmp_path, capsys):
    message = cli_error(
        ["fit", *scenes_args(tmp_path), "--model.init_args.backbone.model_id", "./nowhere/my-sd"], capsys
    )
    assert (
        "model_id './nowhere/my-sd' is a local folder that does not exist" in message
        and "hf download" not in message
    )


def test_corrupt_mask_rcnn_weights_file(tmp_path, monkeypatch):
    from grounded_diffusion.errors import torchvision_weights_file
    from grounded_diffusion.models.backbones import MissingWeightsError
    from grounded_diffusion.models.oracle import MaskRCNNOracle

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    file = torchvision_weights_file(torchvision.models.get_model_weights("maskrcnn_resnet50_fpn_v2").DEFAULT)
    file.parent.mkdir(parents=True)
    file.write_bytes(b"PK\x03\x04 half a download")
    corrupt = MaskRCNNOracle(weights="DEFAULT")  # the file is there: loading waits for a synthesis run
    with pytest.raises(MissingWeightsError) as info:
        corrupt.build()
    message = str(info.value)
    assert f"weights file {file} is corrupt" in message and "delete it" in message and "\n" not in message


def test_oracle_is_built_by_synthesis_only():
    """An oracle in a fit or test config (experiments/offline.yaml has one) costs nothing."""
    from grounded_diffusion.models.oracle import MaskRCNNOracle

    oracle = MaskRCNNOracle(weights=None)
    assert oracle.model is None
    oracle.build()
    assert oracle.model is not None and not any(p.requires_grad for p in oracle.parameters())


# -- reports and launcher --------------------------------------------------------------------


def test_reports_cli_names_a_missing_file_and_the_wrong_table(tmp_path):
    with pytest.raises(SystemExit, match=r"nowhere.json does not exist; --table 1 reads the metrics.json"):
        reports.main([str(tmp_path / "nowhere.json"), "--out", str(tmp_path)])
    zs3 = tmp_path / "report.json"
    zs3.write_text(json.dumps({"architecture": "maskformer", "vocabulary": "pascal"}))
    with pytest.raises(SystemExit, match=r"is the input of --table 2, not the metrics.json"):
        reports.main([str(zs3), "--out", str(tmp_path)])
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"groups": {}}))
    with pytest.raises(SystemExit, match=r"is the input of --table 1, not the report.json"):
        reports.main([str(metrics), "--table", "2", "--out", str(tmp_path)])


@pytest.mark.parametrize(
    "text, expected",
    [
        (None, "does not exist"),
        ("name: x\nparameter: p\nvalues: [1\n", "is not valid YAML"),
        ("name: x\nparameter: p\nvalues: 3\nstages: [[fit]]\n", "values must be a non-empty list, not 3"),
        (
            "name: x\nparameter: p\nvalues: [1]\nstages: [fit, --config, a.yaml]\n",
            "each stage must be a list starting with one of",
        ),
        ("name: x\nvalues: [1]\n", "lacks ['parameter', 'stages']"),
        (
            "name: x\nparameter: p\nvalues: [1]\nstages: [[fit]]\nseeds: [0, 0]\n",
            "seeds must be a non-empty list of distinct whole numbers >= 0, e.g. [0, 1, 2], not [0, 0]",
        ),
        ("name: x\nparameter: p\nvalues: [1]\nstages: [[fit]]\nseeds: 3\n", "seeds must be a non-empty list"),
    ],
)
def test_launcher_names_what_is_wrong_with_a_grid(text, expected, tmp_path):
    grid = tmp_path / "bad.grid.yaml"
    if text is not None:
        grid.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        launch.main([str(grid), "--out", str(tmp_path / "out")])
    assert str(exit_info.value.code).startswith("error: ") and expected in str(exit_info.value.code)


def test_launcher_names_bad_seeds_on_the_command_line(tmp_path):
    grid = tmp_path / "good.grid.yaml"
    grid.write_text("name: x\nparameter: p\nvalues: [1]\nstages: [[fit]]\n")
    with pytest.raises(
        SystemExit,
        match=r"^error: --seeds must be a non-empty list of distinct whole numbers >= 0, e.g. \[0, 1, 2\], not \[1, 1\]$",
    ):
        launch.main([str(grid), "--out", str(tmp_path / "out"), "--seeds", "1", "1"])
    assert not (tmp_path / "out").exists()  # refused before anything ran


# -- data checked before any training step ---------------------------------------------------


def own_segmentation_folder(root: Path) -> Path:
    samples = {
        s: [(f"{s}{i}", *rectangle_image(i, [(1 + i % 2, 4, 4, 30, 30)])) for i in range(3)]
        for s in ("train", "val")
    }
    return write_voc_folder(root, ["cat", "dog"], samples)


def segmenter_fit(folder: Path, out: Path) -> list[str]:
    overlay = out / "mine.yaml"
    out.mkdir(exist_ok=True)
    overlay.write_text(f"data:\n  init_args:\n    val:\n      init_args:\n        root: {folder}\n")
    return [
        "fit",
        "--config",
        str(P2 / "own_data.yaml"),
        "--config",
        str(overlay),
        "--config",
        str(P2 / "offline.yaml"),
        "--data.init_args.batch_size",
        "2",
        "--trainer.default_root_dir",
        str(out),
        "--trainer.logger",
        "false",
        "--trainer.max_steps",
        "2",
        "--trainer.enable_progress_bar",
        "false",
    ]


def test_missing_label_png_stops_fit_before_the_first_step(tmp_path, capsys):
    folder = own_segmentation_folder(tmp_path / "voc")
    (folder / "SegmentationClass" / "val2.png").unlink()  # read by the first validation only
    message = cli_error(segmenter_fit(folder, tmp_path / "run"), capsys)
    assert f"{folder / 'SegmentationClass' / 'val2.png'} does not exist" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def rewrite_label(folder: Path, sample_id: str, labels: np.ndarray, mode: str | None = None) -> None:
    image = Image.fromarray(labels) if mode is None else Image.fromarray(labels).convert(mode)
    image.save(folder / "SegmentationClass" / f"{sample_id}.png")


@pytest.mark.parametrize(
    "labels, mode, expected",
    [
        (
            np.zeros((48, 48), np.uint8) + 1,
            "RGB",
            "is a RGB image; a label map holds one class index per pixel",
        ),
        (
            np.ones((30, 20), np.uint8),
            None,
            "is 20x30 but its image train1.jpg is 48x48; label maps must match their images",
        ),
        (np.full((48, 48), 7, np.uint8), None, "holds label 7 but only 2 classes are listed"),
    ],
)
def test_label_maps_that_do_not_fit_are_named(labels, mode, expected, tmp_path):
    folder = own_segmentation_folder(tmp_path / "voc")
    rewrite_label(folder, "train1", labels, mode)
    with pytest.raises(DataError, match="segmentation folder .*train1.png " + expected.split(" ")[0]) as info:
        FolderSegmentationSet(str(folder)).validate()
    assert expected in str(info.value)


def test_voc_source_images_without_objects_are_named_before_a_build(tmp_path):
    folder = own_segmentation_folder(tmp_path / "voc")
    rewrite_label(folder, "val1", np.zeros((48, 48), np.uint8))
    with pytest.raises(
        DataError, match=r"val1.png has no labelled object .*remove 'val1' from the image set"
    ):
        VOCFolder(str(folder)).prepare()


# -- noise and documented commands -----------------------------------------------------------

NOISE = (
    "💡 Tip",
    "module(s) in eval mode",
    "anonymous setting has no effect",
    "LeafSpec",
    "args parameter is intended",
    "sync_dist=True",
    "callbacks used to create the checkpoint",
)


def test_fit_and_test_print_no_known_noise(scene_cache, tmp_path, capfd, caplog):
    cache = next(scene_cache.glob("cache-*"))
    args = [*scenes_args(tmp_path, steps=2), "--data.init_args.cache_dir", str(cache)]
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO"):
        warnings.simplefilter("default")
        main(["fit", *args])
        main(["test", *args, "--ckpt_path", "last", "--verbose", "false"])
    printed = "\n".join([*capfd.readouterr(), caplog.text, *(str(w.message) for w in caught)])
    assert [line for line in printed.splitlines() if any(n in line for n in NOISE)] == []
    assert not (tmp_path.parent / "wandb").exists() and (tmp_path / "wandb").is_dir()


def test_offline_segmenter_command_in_its_overlay_runs_as_written(capsys):
    """The command in experiments/protocol2/offline.yaml's header (train on a synthetic folder)."""
    import shlex

    lines = (P2 / "offline.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#   lightning fit"))
    command = shlex.split(" ".join(line.lstrip("# ").rstrip("\\") for line in lines[start : start + 2]))[1:]
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert "FolderSegmentationSet" in printed and "root: outputs/offline/pascal-splitall" in printed


# -- devices and memory ----------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_gpu_config_on_a_machine_without_one(tmp_path, capsys):
    message = cli_error(["fit", *scenes_args(tmp_path), "--trainer.accelerator", "gpu"], capsys)
    assert (
        "trainer.accelerator is 'gpu' but this machine has no CUDA GPU" in message
        and "offline.yaml" in message
    )


def test_wandb_logger_without_the_wandb_package(tmp_path, monkeypatch, capsys):
    from lightning.pytorch.loggers import wandb

    monkeypatch.setattr(wandb, "_WANDB_AVAILABLE", False)  # as on a machine without the package
    message = cli_error(
        ["fit", *scenes_args(tmp_path), "--trainer.logger", "grounded_diffusion.loggers.AutoWandbLogger"],
        capsys,
    )
    assert message == (
        "error: trainer.logger: grounded_diffusion.loggers.AutoWandbLogger needs the wandb package: `pip install wandb`, "
        "or run without it: --trainer.logger false, or take it out of the config's trainer.logger list"
    )


def test_half_precision_backbone_on_the_cpu(scene_cache, capsys):
    message = cli_error(
        ["fit", *scenes_args(scene_cache), "--model.init_args.backbone.dtype", "float16"], capsys
    )
    assert "backbone.dtype is float16 but this run is on the CPU" in message and "float32" in message


@pytest.mark.parametrize(
    "subcommand, kept",
    [("fit", "resume with --ckpt_path last"), ("predict", "every sample already written is kept")],
)
def test_cuda_out_of_memory_names_the_batch_size(subcommand, kept, tmp_path, monkeypatch, capsys):
    from lightning_modules.grounding import GroundingModule

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(
        GroundingModule, "training_step" if subcommand == "fit" else "predict_step", out_of_memory
    )
    if subcommand == "fit":
        main(["predict", *scenes_args(tmp_path)])
    message = cli_error([subcommand, *scenes_args(tmp_path)], capsys)
    assert (
        "CUDA ran out of memory at data.init_args.batch_size 4 (per GPU): lower it, e.g. --data.init_args.batch_size 2"
        in message
    )
    assert kept in message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model.init_args.real_image_mode", "nois"],
            "model.init_args.real_image_mode: 'nois' is not one of noise, ddim_inversion; did you mean 'noise'?",
        ),
        (
            ["--model.init_args.backbone.dtype", "float64"],
            "model.init_args.backbone.dtype: 'float64' is not one of float32, float16, bfloat16; did you mean 'float16'?",
        ),
    ],
)
def test_an_enumerated_option_is_checked_at_config_time_with_its_choices(args, message, tmp_path):
    """Literal-typed options: jsonargparse refuses the value before anything is built."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *scenes_args(tmp_path), *args])
    assert exit_info.value.code == f"error: {message}"
