"""A trained grounding head as a portable folder, in the style of diffusers' ``save_pretrained``:

    <folder>/config.json         format and version, the head's widths, the feature groups and text
                                 width it reads, the backbone it was trained on (model id, capture
                                 step and schedule, branches, blocks) and its inference settings
    <folder>/model.safetensors   the head's weights (nothing else: the backbone loads from its id)
    <folder>/README.md           a model card: what it is and how to load it

No pickle on the read path. ``from_pretrained`` takes a folder, or a Hub repository id where
huggingface_hub can reach the Hub; ``push_to_hub`` uploads the folder.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from grounded_diffusion.checkpoint_io import check_checkpoint_kind, read_checkpoint
from grounded_diffusion.errors import ConfigError, UserError
from grounded_diffusion.files import atomic_write
from grounded_diffusion.models.backbone import BackboneConfig, looks_like_local_path
from grounded_diffusion.models.grounding_head import GroundingHead, HeadConfig

FORMAT, FORMAT_VERSION = "grounded-diffusion-head", 1
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
GROUNDING_MODULE = "lightning_modules.grounding.GroundingModule"
EXPORT_COMMAND = "grounded-diffusion export --ckpt_path CHECKPOINT --out FOLDER"


class HeadFolderError(UserError, ValueError):
    """A head folder or repository that is missing, damaged, or of another format."""


@dataclass
class PretrainedHead:
    """A grounding head and what it was trained with.

    Args:
        head: the trained ``GroundingHead`` (it records its feature groups and text width).
        backbone: the frozen diffusion model and capture settings the head's features came from.
        guidance_scale: classifier-free guidance of its training images (the default for generation).
        mask_threshold: a pixel belongs to a category where its probability exceeds this.
        real_image_mode: how real images reach the capture step (``noise``, ``ddim_inversion``).
    """

    head: GroundingHead
    backbone: BackboneConfig
    guidance_scale: float
    mask_threshold: float = 0.5
    real_image_mode: str = "noise"

    def config(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone.identity(),
            "head": asdict(self.head.config),
            "feature_channels": self.head.feature_channels,
            "text_dim": self.head.text_dim,
            "guidance_scale": self.guidance_scale,
            "mask_threshold": self.mask_threshold,
            "real_image_mode": self.real_image_mode,
        }

    # -- writing -----------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the folder (each file whole or absent; config.json last, so a folder with a
        config is complete). Returns its path."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise HeadFolderError(
                f"cannot save the head to {folder}: a file is in the way; give a folder path"
            )
        folder.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        atomic_write(
            folder / WEIGHTS_NAME, lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"})
        )
        atomic_write(folder / CARD_NAME, lambda tmp: tmp.write_text(self._card(), encoding="utf-8"))
        config = json.dumps(self.config(), indent=2) + "\n"
        atomic_write(folder / CONFIG_NAME, lambda tmp: tmp.write_text(config, encoding="utf-8"))
        return folder

    def _card(self) -> str:
        b = self.backbone
        return (
            "---\nlibrary_name: grounded-diffusion\ntags: [grounded-generation, open-vocabulary-segmentation]\n---\n"
            f"# Grounding head for `{b.model_id}`\n\n"
            "A grounding head (Li et al., ICCV 2023) trained on a frozen diffusion model: it returns a mask for "
            f"every category named in a prompt. Features: step {b.capture_step} of {b.num_inference_steps} DDIM "
            f"steps, branches `{b.branches}`; {sum(p.numel() for p in self.head.parameters()):,} parameters.\n\n"
            "```python\nfrom grounded_diffusion import GroundedGenerator\n\n"
            'generator = GroundedGenerator.from_pretrained("THIS_FOLDER_OR_REPO")\n'
            'out = generator("a photograph of a dog and a cat", ["dog", "cat"], seed=0)\n```\n'
        )

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload grounding head",
    ) -> str:
        """Create the Hub repository if needed and upload the saved folder; returns its URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
        return str(commit.repo_url if hasattr(commit, "repo_url") else commit)

    # -- reading -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, name_or_folder: str | Path, revision: str | None = None, token: str | None = None
    ) -> PretrainedHead:
        """A saved head folder, or a Hub repository id (downloaded with huggingface_hub)."""
        folder = _local_folder(str(name_or_folder), revision, token)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not config_path.is_file():
            raise HeadFolderError(
                f"{folder} holds no {CONFIG_NAME}: it is not a saved grounding head (or its save was cut short). "
                f"Export one from a fit checkpoint: `{EXPORT_COMMAND}`"
            )
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise HeadFolderError(
                f"{config_path} is not valid JSON ({error}); export the head again: `{EXPORT_COMMAND}`"
            ) from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise HeadFolderError(
                f"{config_path} is not a grounding head's config (format "
                f"{config.get('format') if isinstance(config, dict) else None!r}, expected {FORMAT!r})"
            )
        if config.get("format_version", 0) > FORMAT_VERSION:
            raise HeadFolderError(
                f"{folder} is format version {config['format_version']}, newer than this grounded-diffusion reads "
                f"({FORMAT_VERSION}): upgrade grounded-diffusion"
            )
        try:
            backbone = BackboneConfig(**config["backbone"])
            head = GroundingHead(
                config["feature_channels"],
                config["text_dim"],
                HeadConfig(**config["head"]),
                num_timesteps=backbone.num_timesteps,
            )
            settings = {k: config[k] for k in ("guidance_scale", "mask_threshold", "real_image_mode")}
        except (KeyError, TypeError) as error:
            raise HeadFolderError(
                f"{config_path} lacks or misnames a field ({error}); export the head again: `{EXPORT_COMMAND}`"
            ) from None
        if not weights_path.is_file():
            raise HeadFolderError(
                f"{folder} has a {CONFIG_NAME} but no {WEIGHTS_NAME}; export the head again: `{EXPORT_COMMAND}`"
            )
        try:
            weights = load_file(str(weights_path))
        except (SafetensorError, OSError) as error:
            raise HeadFolderError(
                f"{weights_path} cannot be read ({error}): it is damaged; export the head again"
            ) from None
        _load_weights(head, weights, str(weights_path))
        return cls(head.eval(), backbone, **settings)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> PretrainedHead:
        """The head of a ``fit`` checkpoint of GroundingModule, with the settings it was trained with."""
        checkpoint = read_checkpoint(path, map_location="cpu")
        check_checkpoint_kind(checkpoint, path, GROUNDING_MODULE)
        hparams = checkpoint.get("hyper_parameters", {})
        state = {
            k.removeprefix("head."): v
            for k, v in checkpoint.get("state_dict", {}).items()
            if k.startswith("head.")
        }
        if not state or "backbone" not in hparams or "head" not in hparams:
            raise HeadFolderError(
                f"checkpoint {path} holds no grounding head (no head weights or settings): give a checkpoint of `fit`"
            )
        # The widths the head reads are in its weights: no need to load the backbone here.
        reduce = sorted(
            (k for k in state if k.startswith("visual_encoder.reduce.") and k.endswith(".weight")),
            key=lambda k: int(k.split(".")[2]),
        )
        backbone = BackboneConfig(**BackboneConfig(**dict(hparams["backbone"])).identity())
        feature_channels = [state[k].shape[1] for k in reduce] * backbone.num_timesteps  # (step-major)
        head = GroundingHead(
            feature_channels,
            state["text_proj.weight"].shape[1],
            HeadConfig(**dict(hparams["head"])),
            num_timesteps=backbone.num_timesteps,
        )
        _load_weights(head, state, str(path))
        return cls(
            head.eval(),
            backbone,
            guidance_scale=float(hparams["guidance_scale"]),
            mask_threshold=float(hparams.get("mask_threshold", 0.5)),
            real_image_mode=str(hparams.get("real_image_mode", "noise")),
        )


def _load_weights(head: GroundingHead, weights: dict[str, torch.Tensor], source: str) -> None:
    ours = head.state_dict()
    differ = sorted(set(ours) ^ set(weights)) or [k for k in ours if ours[k].shape != weights[k].shape]
    if differ:
        raise HeadFolderError(
            f"{source}: the head's weights do not fit its config ({len(differ)} layers differ, e.g. "
            f"{', '.join(differ[:3])}); export the head again: `{EXPORT_COMMAND}`"
        )
    head.load_state_dict(weights)


def _local_folder(name: str, revision: str | None, token: str | None) -> Path:
    """A local folder as is; a Hub id downloaded (config, weights, card) into the Hub cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HeadFolderError(
            f"{path} is a file; give the folder a head was saved to (holding {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    if looks_like_local_path(name) or name.count("/") != 1:
        raise HeadFolderError(
            f"head folder {path.resolve()} does not exist: give a folder saved by `save_pretrained` or `{EXPORT_COMMAND}`"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                name, revision=revision, token=token, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]
            )
        )
    except Exception as error:  # offline, unknown repository, no access: huggingface_hub's many errors
        detail = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise HeadFolderError(
            f"'{name}' is neither a local folder nor a Hub repository that could be downloaded ({detail}); "
            "give a local head folder, or download it on a machine with network access"
        ) from None


def check_compatible(pretrained: PretrainedHead, backbone) -> None:
    """The backbone gives the features the head was trained on: same groups and widths, same
    text width, same capture timestep, branches and blocks; else one line naming both."""
    head, trained = pretrained.head, pretrained.backbone
    given = backbone.feature_channels()
    if given != head.feature_channels or backbone.text_dim != head.text_dim:
        raise ConfigError(
            f"this head was trained on {trained.model_id} (feature groups {head.feature_channels}, text width "
            f"{head.text_dim}), but the backbone {backbone.config.model_id} gives {given} and {backbone.text_dim}: "
            f"use model_id {trained.model_id!r}, or train a head on this backbone"
        )
    timestep = backbone.timestep_of(trained.num_inference_steps, trained.capture_step)
    settings = {
        "capture timestep": (timestep, backbone.timestep),
        "branches": (trained.branches, backbone.config.branches),
        "blocks": (trained.blocks, backbone.config.blocks),
        # (diffusion transformers' features depend on these too)
        "image_size": (trained.image_size, backbone.config.image_size),
        "max_sequence_length": (trained.max_sequence_length, backbone.config.max_sequence_length),
        "guidance_embedding": (trained.guidance_embedding, backbone.config.guidance_embedding),
        "fusion_steps": (trained.fusion_steps, backbone.config.fusion_steps),
    }
    differ = {k: v for k, v in settings.items() if v[0] != v[1]}
    if differ:
        details = "; ".join(f"{k}: head {a!r}, backbone {b!r}" for k, (a, b) in differ.items())
        raise ConfigError(
            f"this head was trained on features captured otherwise ({details}; the head: step {trained.capture_step} "
            f"of {trained.num_inference_steps}): build the backbone with the head's capture settings"
        )
