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
from safetensors.torch import load_file, save

from grounded_diffusion.checkpoint_io import check_checkpoint_kind, read_checkpoint
from grounded_diffusion.errors import ConfigError, UserError, check_choice, real_number, whole_number
from grounded_diffusion.files import check_writable_folder, replace_folder
from grounded_diffusion.inference import RealImageMode
from grounded_diffusion.models.backbones import BackboneConfig, looks_like_local_path
from grounded_diffusion.models.grounding_head import GroundingHead, HeadConfig

FORMAT, FORMAT_VERSION = "grounded-diffusion-head", 1
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
HEAD_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
HEAD_FIELDS = (
    "backbone",
    "head",
    "feature_channels",
    "text_dim",
    "guidance_scale",
    "mask_threshold",
    "real_image_mode",
)
IDENTITY_FIELDS = tuple(BackboneConfig().identity())
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

    def save_pretrained(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the folder, whole or not at all: the files are written into a temporary folder
        beside it, which then takes its place (``files.replace_folder``), so a save cut short
        leaves the previous head as it was. A folder that holds anything but a head is refused;
        a head is replaced only with ``overwrite``. Returns its path."""
        folder = Path(folder)
        check_head_destination(folder, overwrite)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        data = save(weights, metadata={"format": "pt"})  # (bytes: a write error is then an OSError)
        config = json.dumps(self.config(), indent=2) + "\n"

        def write(tmp: Path) -> None:
            (tmp / WEIGHTS_NAME).write_bytes(data)
            (tmp / CARD_NAME).write_text(self._card(), encoding="utf-8")
            (tmp / CONFIG_NAME).write_text(config, encoding="utf-8")

        return replace_folder(folder, write, "the folder is as it was")

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
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            try:
                api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
                commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
            except Exception as error:  # offline, not logged in, no access: huggingface_hub's many errors
                detail = (
                    str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
                )
                raise HeadFolderError(
                    f"cannot upload to the Hub repository '{repo_id}' ({detail}): log in (`hf auth login`) on a "
                    "machine with network access, and check the repository's name and your access"
                ) from None
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
        backbone, head, settings = head_settings(config, str(config_path))
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
        if "text_proj.weight" not in state or "backbone" not in hparams or "head" not in hparams:
            raise HeadFolderError(
                f"checkpoint {path} holds no grounding head (no head weights or settings): give a checkpoint of `fit`"
            )
        # The widths the head reads are in its weights: no need to load the backbone here. The
        # checkpoint's settings then pass the same checks as a head folder's config.json.
        reduce = sorted(
            (k for k in state if k.startswith("visual_encoder.reduce.") and k.endswith(".weight")),
            key=lambda k: int(k.split(".")[2]),
        )
        backbone = hparams["backbone"]
        fusion_steps = backbone.get("fusion_steps") if isinstance(backbone, dict) else None
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "backbone": {k: v for k, v in dict(backbone).items() if k in IDENTITY_FIELDS},
            "head": dict(hparams["head"]),
            "feature_channels": [int(state[k].shape[1]) for k in reduce] * (1 + len(fusion_steps or [])),
            "text_dim": int(state["text_proj.weight"].shape[1]),
            "guidance_scale": hparams.get("guidance_scale"),
            "mask_threshold": hparams.get("mask_threshold", 0.5),
            "real_image_mode": hparams.get("real_image_mode", "noise"),
        }
        backbone, head, settings = head_settings(config, f"checkpoint {path}")
        _load_weights(head, state, str(path))
        return cls(head.eval(), backbone, **settings)


def head_settings(config, where: str) -> tuple[BackboneConfig, GroundingHead, dict]:
    """A head's config (a folder's ``config.json``, or what a checkpoint records), checked field by
    field: the backbone settings, the head (built, untrained, with these widths) and the
    inference settings. Anything missing, of the wrong type or out of range is one line naming
    ``where`` and the field: head folders and checkpoints go through this one validator."""
    fix = f"export the head again: `{EXPORT_COMMAND}`"
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise HeadFolderError(
            f"{where} is not a grounding head's config (format {found!r}, expected {FORMAT!r})"
        )
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise HeadFolderError(
            f"{where}: format_version is {version!r}, not a version number (1, 2, ...); {fix}"
        )
    if version > FORMAT_VERSION:
        raise HeadFolderError(
            f"{where} is format version {version}, newer than this grounded-diffusion reads ({FORMAT_VERSION}): "
            "upgrade grounded-diffusion"
        )
    missing = [k for k in HEAD_FIELDS if k not in config]
    if missing:
        raise HeadFolderError(f"{where} lacks the field {missing[0]!r}; {fix}")
    try:
        for key in ("backbone", "head"):
            if not isinstance(config[key], dict):
                raise ConfigError(f"{key} is {config[key]!r}, not a set of fields")
        backbone = BackboneConfig(**config["backbone"])
        if not isinstance(backbone.model_id, str) or not backbone.model_id:
            raise ConfigError(f"backbone.model_id is {backbone.model_id!r}, not a model's id or folder")
        head_config = HeadConfig(**config["head"])
        channels = config["feature_channels"]
        if not isinstance(channels, list) or not channels:
            raise ConfigError(f"feature_channels is {channels!r}, not a list of widths")
        channels = [whole_number("feature_channels", c, 1) for c in channels]
        text_dim = whole_number("text_dim", config["text_dim"], 1)
        settings = {
            "guidance_scale": real_number("guidance_scale", config["guidance_scale"], 0.0, None),
            "mask_threshold": real_number("mask_threshold", config["mask_threshold"], 0.0, 1.0, 0.5),
            "real_image_mode": config["real_image_mode"],
        }
        check_choice("real_image_mode", settings["real_image_mode"], RealImageMode)
        head = GroundingHead(channels, text_dim, head_config, num_timesteps=backbone.num_timesteps)
    except TypeError as error:  # an unknown or misnamed field of backbone / head
        raise HeadFolderError(f"{where} lacks or misnames a field ({error}); {fix}") from None
    except ConfigError as error:
        raise HeadFolderError(f"{where}: {str(error).removeprefix('model.init_args.')}; {fix}") from None
    return backbone, head, settings


def is_head_folder(folder: Path) -> bool:
    """A folder that holds a saved head and nothing else (what ``overwrite`` may replace)."""
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    return isinstance(config, dict) and config.get("format") == FORMAT and names <= set(HEAD_FILES)


def check_head_destination(folder: Path, overwrite: bool) -> None:
    """Where a head is saved: a new or empty folder, or (``overwrite``) a head folder; never a
    folder of other files, which the save would replace. One line, before any work."""
    if folder.exists() and not folder.is_dir():
        raise HeadFolderError(f"cannot save the head to {folder}: a file is in the way; give a folder path")
    check_writable_folder(folder, "--out")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not is_head_folder(folder):
        names = sorted(p.name for p in folder.iterdir())
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise HeadFolderError(
            f"{folder} is not empty and not a head folder (it holds {shown}), and saving would replace it: give a "
            "new or empty folder"
        )
    if not overwrite:
        raise HeadFolderError(
            f"{folder} already holds a head; replace it with --overwrite (Python: save_pretrained(..., "
            "overwrite=True)), or give another folder"
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
