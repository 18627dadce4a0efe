"""Modules that moved keep their old import paths (configs, checkpoints and users' code name them):
each old path gives the very objects of the new one, and a checkpoint that records an old class
path is taken by a config that names the new one."""

from __future__ import annotations

import importlib

import pytest

from grounded_diffusion.checkpoint_io import check_checkpoint_kind

MOVED = [
    ("grounded_diffusion.models.backbone", "grounded_diffusion.models.backbones", "build_backbone"),
    ("grounded_diffusion.models.backbone", "grounded_diffusion.models.backbones", "MissingWeightsError"),
    (
        "grounded_diffusion.models.dit_backbone",
        "grounded_diffusion.models.backbones",
        "DiffusionTransformerBackbone",
    ),
    ("grounded_diffusion.generator", "grounded_diffusion.api", "GroundedGenerator"),
    ("grounded_diffusion.training", "grounded_diffusion.fit_faults", "check_finite_loss"),
    ("grounded_diffusion.world", "grounded_diffusion.shapes_world.diagnostics", "main"),
    ("grounded_diffusion.data.shapes_world", "grounded_diffusion.shapes_world.render", "render_shapes_scene"),
    ("grounded_diffusion.models.shapes_sd", "grounded_diffusion.shapes_world.models", "SHAPES_SD_ID"),
    ("grounded_diffusion.data.scenes", "grounded_diffusion.data.procedural_scenes", "ProceduralScenes"),
    ("datamodules.rendered_scenes", "datamodules.world_scenes", "RenderedScenesDataModule"),
    ("lightning_modules.autoencoder", "lightning_modules.world_autoencoder", "AutoencoderModule"),
    ("lightning_modules.text_to_image", "lightning_modules.world_text_to_image", "TextToImageModule"),
]


@pytest.mark.parametrize("old, new, name", MOVED)
def test_an_old_import_path_gives_the_objects_of_the_new_one(old, new, name):
    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name)


def test_a_checkpoint_recording_a_moved_class_path_is_of_the_same_model():
    old = {"hyper_parameters": {"_class_path": "lightning_modules.text_to_image.TextToImageModule"}}
    check_checkpoint_kind(old, "last.ckpt", "lightning_modules.world_text_to_image.TextToImageModule")
