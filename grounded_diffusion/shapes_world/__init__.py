"""The shapes world: the miniature in which the project trains every model of its embedded
default, in one package.

- ``render.py``: its scenes (colour x shape objects on textured backgrounds), captions, the
  20-category world and the wide 48-category one, and their splits (held-out words too);
- ``models.py``: the architectures of its Stable Diffusion, MM-DiT and VAE, and their ids;
- ``weights/``: the trained models, shipped (``embedded/shapes-sd``, ``-dit``, ``-oracle``, the
  wide world's), resolved through ``grounded_diffusion/models/embedded.py``, which also names the
  Makefile target that retrains each (``make world``, ``world-wide``, ``world-dit``);
- ``diagnostics.py``: how well its models draw and segment what prompts name, and where unseen
  words fall (``python -m grounded_diffusion.shapes_world --help``).

Its trainers are Lightning modules, ``lightning_modules/world_autoencoder.py`` and
``world_text_to_image.py``, fed by ``datamodules/world_scenes.py``. (The procedural scenes of
``experiments/scenes.yaml``, ``data/procedural_scenes.py``, are another, older set.)
"""
