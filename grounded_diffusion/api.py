"""Grounded generation and open-vocabulary segmentation from Python.

    from grounded_diffusion import GroundedGenerator

    generator = GroundedGenerator.from_pretrained("outputs/shapes/head")   # or .from_checkpoint(ckpt)
    out = generator(["a photograph of a red circle and a blue ring"], ["red circle", "blue ring"], seed=0)
    out.images[0], out.masks[0]            # PIL image; bool [2, H, W], one mask per named category
    out.overlays()[0].save("overlay.png")  # masks painted over the image, with a legend
    out.save("outputs/mine")               # VOC-style folder + COCO RLE annotations (as `predict` writes)

    seg = generator.segment(["photo.jpg"], ["red circle"])   # real images, any size

The same seed gives the same images and masks as a ``predict`` run of experiments/generate.yaml
(a PromptList with that seed) with the same head.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor
from tqdm.auto import tqdm

from grounded_diffusion.data.grounded_folder import (
    MAX_CLASSES,
    GroundedImageFolder,
    label_format,
    overlay,
    semantic_labels,
)
from grounded_diffusion.data.prompts import ONE_OBJECT_TEMPLATE, TWO_OBJECT_TEMPLATE, prompt_seed
from grounded_diffusion.data.validation import MIN_SIDE, decoded_image
from grounded_diffusion.data.voc import PALETTE_RGB
from grounded_diffusion.errors import ConfigError, UserError, check_choice, real_number, whole_number
from grounded_diffusion.inference import (
    HEAD,
    RealImageMode,
    check_method,
    ground_generated,
    ground_generated_training_free,
    real_image_features,
    segment_real,
    training_free_probabilities,
)
from grounded_diffusion.models.backbones import DTYPES, FrozenBackbone, build_backbone, check_category_tokens
from grounded_diffusion.models.pretrained_head import PretrainedHead, check_compatible


class ImageInputError(UserError, ValueError):
    """An image given to ``segment`` that cannot be read or used."""


@dataclass
class GroundedImages:
    """Images with one mask probability map per named category.

    images: RGB PIL images; probabilities: per image, float32 [O, H, W] at the image's size, O =
    its categories in order; prompts: what the model was conditioned on; seeds: each image's
    noise seed.
    """

    images: list[Image.Image]
    categories: list[list[str]]
    probabilities: list[Tensor]
    prompts: list[str]
    seeds: list[int]
    mask_threshold: float = 0.5

    @property
    def masks(self) -> list[Tensor]:
        """Per image, bool [O, H, W]: where each category's probability reaches the threshold."""
        return [p >= self.mask_threshold for p in self.probabilities]

    @property
    def classes(self) -> list[str]:
        """Every category, in order of first appearance (label k + 1 in label maps and folders)."""
        return list(dict.fromkeys(c for cs in self.categories for c in cs))

    def label_maps(self) -> list[np.ndarray]:
        """Per image, [H, W]: 0 background, k + 1 = ``classes[k]``, each pixel taking its most
        probable category above the threshold; uint8, or uint16 over 254 classes (as ``save``
        writes them: ``grounded_folder.label_format``)."""
        classes = self.classes
        dtype = np.uint8 if label_format(len(classes))["bits"] == 8 else np.uint16
        return [
            semantic_labels(p[None], torch.tensor([[classes.index(c) + 1 for c in cs]]), self.mask_threshold)[
                0
            ]
            .numpy()
            .astype(dtype)
            for p, cs in zip(self.probabilities, self.categories)
        ]

    def overlays(self, min_side: int = 256) -> list[Image.Image]:
        """Each image with its masks painted in the VOC palette's colours and a legend below
        (images under ``min_side`` pixels are enlarged, pixel for pixel, to be seen)."""
        classes = self.classes
        drawn = []
        for image, labels, categories in zip(self.images, self.label_maps(), self.categories):
            picture = Image.fromarray(overlay(np.asarray(image), labels))
            scale = max(1, -(-min_side // min(picture.size)))
            picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
            drawn.append(_with_legend(picture, [(c, classes.index(c) + 1) for c in categories]))
        return drawn

    def save(
        self, folder: str | Path, split: str = "images", ignore_band: float = 0.0, overlays: bool = True
    ) -> Path:
        """Write a VOC-style folder with COCO RLE annotations, as ``predict`` does
        (``grounded_diffusion.data.grounded_folder``); images already in the folder are kept and
        these are numbered after them. Returns the folder."""
        target = GroundedImageFolder(folder)
        target.initialise(self.classes)
        start = len(target.manifest.done_ids())
        batch = {
            "id": [f"{start + i:06d}" for i in range(len(self.images))],
            "split": [split] * len(self.images),
            "prompt": self.prompts,
            "categories": self.categories,
        }
        for i, (image, probs) in enumerate(zip(self.images, self.probabilities)):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
            target.write_batch(
                {**one, "image": pixels, "probs": probs[None]},
                self.classes,
                self.mask_threshold,
                ignore_band,
                overlays,
            )
        target.finalize()
        return target.root


def _with_legend(picture: Image.Image, entries: list[tuple[str, int]]) -> Image.Image:
    """The picture with one line per (name, label) below it: a swatch of the label's colour, the name."""
    line = 16
    out = Image.new("RGB", (max(picture.width, 160), picture.height + line * len(entries) + 4), "white")
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    for row, (name, label) in enumerate(entries):
        top = picture.height + 2 + row * line
        draw.rectangle(
            [4, top + 2, 16, top + 13], fill=tuple(int(v) for v in PALETTE_RGB[label]), outline="black"
        )
        draw.text((22, top + 1), name, fill="black")
    return out


def caption(categories: Sequence[str]) -> str:
    """The paper's prompt over the named categories, as the real-image sources make it."""
    if len(categories) == 1:
        return ONE_OBJECT_TEMPLATE.format(c1=categories[0])
    if len(categories) == 2:
        return TWO_OBJECT_TEMPLATE.format(c1=categories[0], c2=categories[1])
    return "a photograph of a " + " and a ".join(categories)


class GroundedGenerator:
    """A frozen diffusion model and a trained grounding head: prompt -> image + one mask per
    named category (``__call__``), or real image -> masks (``segment``).

    Build it with ``from_pretrained`` (a saved head folder or Hub repository) or
    ``from_checkpoint`` (a ``fit`` checkpoint); the backbone is the one the head was trained on.
    """

    def __init__(self, backbone: FrozenBackbone, head: PretrainedHead) -> None:
        check_compatible(head, backbone)
        self.backbone, self.pretrained = backbone, head
        self.head = head.head.to(backbone.device).eval()

    # -- building -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_folder: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        model_id: str | None = None,
        **hub,
    ) -> GroundedGenerator:
        """A head saved by ``save_pretrained`` or ``grounded-diffusion export`` (a folder, or a
        Hub repository id; ``hub``: ``revision``, ``token``).

        Args:
            device: default CUDA when available, else the CPU.
            dtype: of the frozen model; default the head's training dtype on a GPU, float32 on a CPU.
            model_id: load the backbone from here instead of the id the head records (a local
                copy of the same weights); checked to give the features the head was trained on.
        """
        return cls.from_head(PretrainedHead.from_pretrained(name_or_folder, **hub), device, dtype, model_id)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        model_id: str | None = None,
    ) -> GroundedGenerator:
        """The head of a GroundingModule ``fit`` checkpoint (arguments as ``from_pretrained``)."""
        return cls.from_head(PretrainedHead.from_checkpoint(path), device, dtype, model_id)

    @classmethod
    def from_head(
        cls, head: PretrainedHead, device=None, dtype=None, model_id: str | None = None
    ) -> GroundedGenerator:
        """A loaded ``PretrainedHead`` with the backbone it records (arguments as ``from_pretrained``)."""
        device = torch_device(device)
        if isinstance(dtype, torch.dtype):
            dtype = next((name for name, d in DTYPES.items() if d == dtype), str(dtype))
        dtype = dtype or (head.backbone.dtype if device.type == "cuda" else "float32")
        check_choice("dtype", dtype, tuple(DTYPES))
        if device.type == "cpu" and dtype == "float16":
            raise ConfigError(
                "dtype float16 on the CPU: its UNet kernels are missing or very slow; use float32 or bfloat16"
            )
        if model_id not in (None, head.backbone.model_id):  # shapes are checked; the weights cannot be
            warnings.warn(
                f"loading the backbone from {model_id} for a head trained on {head.backbone.model_id}: "
                "it must hold the same weights",
                stacklevel=3,
            )
        config = replace(head.backbone, dtype=dtype, model_id=model_id or head.backbone.model_id)
        return cls(build_backbone(config).to(device), head)

    def save_pretrained(self, folder: str | Path, overwrite: bool = False) -> Path:
        """The head's portable folder (config.json, model.safetensors, README.md): a new or empty
        folder, or with ``overwrite`` a head folder, replaced whole."""
        return self.pretrained.save_pretrained(folder, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload the head's folder to the Hugging Face Hub (``private``, ``token``)."""
        return self.pretrained.push_to_hub(repo_id, **kwargs)

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | Sequence[str],
        categories: Sequence[str] | Sequence[Sequence[str]],
        seed: int | Sequence[int] = 0,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        batch_size: int = 4,
        progress: bool = True,
        method: str = HEAD,
        threshold: float | None = None,
    ) -> GroundedImages:
        """Generate one image per prompt and segment the categories named for it.

        Args:
            prompts: one prompt or a list.
            categories: the names to segment: one list for every prompt, or one list per prompt.
                Any names (open vocabulary), not only those the head was trained on.
            seed: an int gives prompt i the noise of a PromptList with this seed (``predict``
                makes the same images); a list gives each prompt's noise seed.
            guidance_scale: default the head's training value.
            num_inference_steps: DDIM steps, default the head's; a schedule must pass through
                the capture timestep (the error lists those that do).
            batch_size: prompts per model call.
            method: ``head`` (the trained head), or a training-free method to compare with:
                the backbone's baseline (``daam`` on a UNet, ``joint_attention`` on a diffusion
                transformer) or ``concept_attention`` (diffusion transformers).
            threshold: a training-free method's τ on its normalised map (default 0.4, DAAM's;
                ConceptAttention by default takes the argmax over the categories and the
                background concept, as its paper scores several classes). Not for the head.
        """
        method = check_method(self.backbone, method)
        threshold = self._check_threshold(method, threshold)
        prompts = _texts(prompts, "prompts")
        categories = self._per_image(categories, len(prompts), "prompts")
        seeds = self._seeds(seed, len(prompts))
        guidance = self.pretrained.guidance_scale if guidance_scale is None else guidance_scale
        guidance = real_number("guidance_scale", guidance, 0.0, None, self.pretrained.guidance_scale)
        batch_size = whole_number("batch_size", batch_size, 1, None, 4)
        if num_inference_steps is not None:  # (0 is refused, not taken for the default)
            default = self.backbone.config.num_inference_steps
            num_inference_steps = whole_number("num_inference_steps", num_inference_steps, 1, None, default)
        self.backbone.capture_step_for(num_inference_steps or self.backbone.config.num_inference_steps)
        images, probabilities, mask_threshold = [], [], self.pretrained.mask_threshold
        for start in tqdm(
            range(0, len(prompts), batch_size), desc="grounded generation", disable=not progress, leave=False
        ):
            part = slice(start, start + batch_size)
            args = (prompts[part], categories[part], seeds[part], guidance, num_inference_steps)
            if method == HEAD:
                pixels, probs = ground_generated(self.backbone, self.head, *args)
            else:
                pixels, maps = ground_generated_training_free(self.backbone, method, *args)
                probs, mask_threshold = training_free_probabilities(
                    maps, method, pixels.shape[-2:], threshold
                )
            images += [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]
            probabilities += [p[: len(cs)].float().cpu() for p, cs in zip(probs, categories[part])]
        return GroundedImages(images, categories, probabilities, prompts, seeds, mask_threshold)

    # -- real images --------------------------------------------------------------------------

    @torch.no_grad()
    def segment(
        self,
        images,
        categories: Sequence[str] | Sequence[Sequence[str]],
        prompt: str | Sequence[str] | None = None,
        mode: str | None = None,
        seed: int = 0,
        batch_size: int = 4,
        progress: bool = True,
        method: str = HEAD,
        threshold: float | None = None,
    ) -> GroundedImages:
        """Open-vocabulary segmentation of real images with the trained head (paper §4.1), or
        with a training-free method's maps of the same denoiser call (``method``, ``threshold``:
        as for generation).

        Args:
            images: one image or a list: file paths, PIL images, uint8 arrays [H, W, 3] or
                uint8 tensors [3, H, W], any size (resized to the model's, masks mapped back).
            categories: the names to segment: one list for every image, or one list per image.
            prompt: what the UNet is conditioned on (one for all, or one per image); default
                "a photograph of a {c1} and a {c2}" over the image's categories.
            mode: ``noise`` (forward diffusion to the capture step) or ``ddim_inversion``;
                default the head's.
            seed: the noise of image i is drawn from this seed and i.
        """
        method = check_method(self.backbone, method)
        threshold = self._check_threshold(method, threshold)
        single = isinstance(images, (str, Path, Image.Image)) or (
            hasattr(images, "ndim") and images.ndim == 3
        )
        if not single and not (_is_list(images) or (hasattr(images, "ndim") and images.ndim == 4)):
            raise ImageInputError(
                f"images is a {type(images).__name__}; give an image (path, PIL image, uint8 array) or a list of them"
            )
        pictures = [_rgb(image, i) for i, image in enumerate([images] if single else list(images))]
        if not pictures:
            raise ImageInputError("images is empty: give at least one image")
        categories = self._per_image(categories, len(pictures), "images")
        if prompt is None:
            prompts = [caption(cs) for cs in categories]
        else:
            prompts = [prompt] * len(pictures) if isinstance(prompt, str) else _texts(prompt, "prompt")
            if len(prompts) != len(pictures):
                raise ConfigError(
                    f"{len(prompts)} prompts for {len(pictures)} images: give one prompt, or one per image"
                )
        mode = mode or self.pretrained.real_image_mode
        check_choice("mode", mode, RealImageMode)
        batch_size = whole_number("batch_size", batch_size, 1, None, 4)
        seeds = self._seeds(seed, len(pictures))
        side, device = self.backbone.image_size, self.backbone.device
        probabilities, mask_threshold = [], self.pretrained.mask_threshold
        for start in tqdm(
            range(0, len(pictures), batch_size), desc="segmentation", disable=not progress, leave=False
        ):
            part = slice(start, start + batch_size)
            resized = [
                np.asarray(p.resize((side, side), Image.BICUBIC)) if p.size != (side, side) else np.asarray(p)
                for p in pictures[part]
            ]
            batch = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).to(device)
            args = (batch, prompts[part], categories[part], seeds[part], mode)
            if method == HEAD:
                probs = segment_real(self.backbone, self.head, *args)
            else:
                maps = real_image_features(self.backbone, *args, methods=[method])[2][method]
                probs, mask_threshold = training_free_probabilities(maps, method, batch.shape[-2:], threshold)
            for picture, p, cs in zip(pictures[part], probs, categories[part]):
                p = p[: len(cs)].float()
                if p.shape[-2:] != (picture.height, picture.width):  # back to the image's own size
                    p = F.interpolate(
                        p[None], size=(picture.height, picture.width), mode="bilinear", align_corners=False
                    )[0]
                probabilities.append(p.cpu())
        return GroundedImages(pictures, categories, probabilities, prompts, seeds, mask_threshold)

    # -- input checks (before any work) --------------------------------------------------------

    @staticmethod
    def _check_threshold(method: str, threshold) -> float | None:
        if threshold is None:
            return None
        if method == HEAD:
            raise ConfigError(
                "threshold is a training-free method's τ; the head's masks use the mask_threshold "
                "its folder records: leave threshold None with method 'head'"
            )
        return real_number("threshold", threshold, 0.0, 1.0, 0.4)

    def _per_image(self, categories, count: int, what: str) -> list[list[str]]:
        if isinstance(categories, str):
            raise ConfigError(
                f"categories is the string {categories!r}: give a list of names, e.g. [{categories!r}]"
            )
        if _is_list(categories) and not len(categories):
            raise ConfigError("no category names given: name at least one category to segment, e.g. ['dog']")
        if not _is_list(categories):
            raise ConfigError(
                f"categories is {categories!r} ({type(categories).__name__}): give a list of names, e.g. ['dog']"
            )
        categories = list(categories)
        if all(isinstance(c, str) for c in categories):
            per_image = [list(categories)] * count
        elif all(_is_list(c) for c in categories):
            if len(categories) != count:
                raise ConfigError(
                    f"categories must be one list of names for all {what}, or one list per {what[:-1]} "
                    f"({count}); got {len(categories)} entries"
                )
            per_image = [list(cs) for cs in categories]
        else:
            bad = next(c for c in categories if not isinstance(c, str))
            raise ConfigError(
                f"categories holds {bad!r} ({type(bad).__name__}): give names as text, e.g. ['dog', 'cat'], or one "
                f"list of names per {what[:-1]}"
            )
        for number, names in enumerate(per_image):
            if not names:
                raise ConfigError(
                    f"no category names given for {what[:-1]} {number}: name at least one category, e.g. ['dog']"
                )
            bad = [n for n in names if not isinstance(n, str)]
            if bad:
                raise ConfigError(
                    f"categories of {what[:-1]} {number} holds {bad[0]!r} ({type(bad[0]).__name__}): give names as text"
                )
            if len(set(names)) < len(names):
                raise ConfigError(f"categories of {what[:-1]} {number} name one category twice: {names}")
        classes = list(dict.fromkeys(c for cs in per_image for c in cs))
        if len(classes) > MAX_CLASSES:
            raise ConfigError(
                f"{len(classes)} distinct category names: label maps hold at most {MAX_CLASSES} (16-bit); "
                "split the call into parts with fewer names"
            )
        check_category_tokens(self.backbone.tokenizer, classes)
        return per_image

    @staticmethod
    def _seeds(seed: int | Sequence[int], count: int) -> list[int]:
        if not _is_list(seed):  # one seed: an int, a numpy integer, or an integral float
            return [prompt_seed(whole_number("seed", seed, 0), i) for i in range(count)]
        seeds = [whole_number(f"seed[{i}]", s, 0) for i, s in enumerate(seed)]
        if len(seeds) != count:
            raise ConfigError(f"{len(seeds)} seeds for {count} images: give one int, or one seed per image")
        return seeds


def _is_list(value) -> bool:
    """A list-like of values (list, tuple, numpy array), not a string."""
    return isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1)


def _texts(texts, key: str) -> list[str]:
    """One text or a list of them, as a list; one line for anything else (None, numbers)."""
    texts = [texts] if isinstance(texts, str) else list(texts) if _is_list(texts) else None
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ConfigError(f"{key} must be a text or a non-empty list of texts, e.g. 'a photograph of a dog'")
    return texts


def torch_device(device) -> torch.device:
    """``device`` (a name such as ``cuda:1`` or a torch.device; default CUDA when there is one)
    as a torch.device this machine has, or one line."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(
            f"device {device!r} is not a torch device ({error}); give 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' but this machine has no CUDA GPU: give device='cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device '{device}' but this machine has {torch.cuda.device_count()} CUDA GPUs (cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1})"
        )
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(f"device '{device}': the models run on 'cpu' or 'cuda' (or 'mps', 'xpu')")
    return device


def _rgb(image, index: int) -> Image.Image:
    """An input image as an RGB PIL image, or one line saying why it cannot be one."""
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise ImageInputError(f"images[{index}]: {image} does not exist (or is not a file)")
        picture = decoded_image(Path(image), fix="give a readable image file")
        if isinstance(picture, str):
            raise ImageInputError(f"images[{index}]: {picture}")
        image = picture
    if isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ImageInputError(
                f"images[{index}] is a {image.dtype} tensor of shape {list(image.shape)}; give uint8 RGB [3, H, W]"
            )
        image = image.permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ImageInputError(
                f"images[{index}] is a {image.dtype} array of shape {list(image.shape)}; give uint8 RGB [H, W, 3]"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ImageInputError(
            f"images[{index}] is a {type(image).__name__}; give a file path, a PIL image, or a uint8 array or tensor"
        )
    if min(image.size) < MIN_SIDE:
        raise ImageInputError(
            f"images[{index}] is {image.size[0]}x{image.size[1]}, under {MIN_SIDE} pixels a side: too small to segment"
        )
    return image.convert("RGB")
