"""Images with label maps for a standard semantic segmenter (Protocol II): synthetic grounded
images, real PASCAL VOC / COCO, or their mixture (synthetic + real images of seen classes only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from datamodules.base import BaseDataModule
from grounded_diffusion.data.segmentation_sets import IGNORE_LABEL, BackgroundMode, SegmentationSet
from grounded_diffusion.data.vocabulary import CategorySplit, check_categories
from grounded_diffusion.errors import ConfigError, check_choice


class SegmentationSamples(Dataset):
    """A set's images at ``size`` x ``size`` with labels in the target vocabulary (see
    ``SegmentationDataModule.background``; 255 ignore). Training: labels resized with the image
    (the datamodule flips batches on the device). Evaluation: labels at the image's original
    resolution, untouched (the segmenter's scores are upsampled to them), so the scores are the
    ZS3 literature's."""

    def __init__(
        self, dataset: SegmentationSet, indices: list[int], lookup: torch.Tensor, size: int, train: bool
    ) -> None:
        self.dataset, self.indices, self.lookup, self.size, self.train = dataset, indices, lookup, size, train

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        image, labels = self.dataset[self.indices[index]]
        size = (self.size, self.size)
        image = F.interpolate(
            image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
        )[0]
        labels = self.lookup[labels.long()]
        if self.train:
            labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0]
        return {"image": image.clamp(0, 255).round().to(torch.uint8), "labels": labels.to(torch.uint8)}


def flip_horizontally(batch: dict) -> dict:
    """Each image of a training batch mirrored with its labels, with probability 1/2, drawn for the
    whole batch at once from the global RNG of the batch's device."""
    image, labels = batch["image"], batch["labels"]
    flip = torch.rand(len(image), device=image.device) < 0.5
    return {
        **batch,
        "image": torch.where(flip[:, None, None, None], image.flip(-1), image),
        "labels": torch.where(flip[:, None, None], labels.flip(-1), labels),
    }


def collate_evaluation(samples: list[dict]) -> dict:
    """Images stacked (all ``image_size``); labels a list, each at its image's own resolution."""
    return {"image": torch.stack([s["image"] for s in samples]), "labels": [s["labels"] for s in samples]}


class SegmentationDataModule(BaseDataModule):
    """
    Args:
        vocabulary: ``pascal`` (20 classes), ``coco`` (80), a classes file (one name per line;
            a first line ``background`` is skipped) or a list of names: what the segmenter predicts.
        split: the seen/unseen split scored by ZS3 (``zs3``: the standard one, VOC 15/5 with
            unseen pottedplant, sheep, sofa, train, tvmonitor; COCO 65/15), or
        unseen / seen: the unseen (or seen) classes listed; none of the three: all seen.
        train: the training sets, concatenated: e.g. a synthetic folder, plus real images with
            ``seen_only: true`` for the mixture.
        val: the evaluation set (real VOC val / COCO val); ``test`` defaults to it.
        image_size: the segmenter sees images at this square size (paper: 224); training labels
            are resized with them, evaluation labels stay at each image's original resolution.
        background: ``ignore`` (the ZS3 convention on PASCAL VOC, as ZegFormer: background
            pixels are 255 in training and evaluation, and the segmenter predicts the
            vocabulary's classes only, label k = vocabulary[k]) or ``class`` (background is class
            0 and label k = vocabulary[k - 1]: VOC's 21-class variant; COCO's 80 thing classes).
        check_data: before fit / validate / test, check every file the stage reads (exists,
            image and label map of one size, labels within the class list); a bad file stops
            the run at once, naming it.
    """

    def __init__(
        self,
        vocabulary: str | list[str] = "pascal",
        split: int | str | None = None,
        unseen: list[str] | None = None,
        seen: list[str] | None = None,
        train: list[SegmentationSet] | None = None,
        val: SegmentationSet | None = None,
        test: SegmentationSet | None = None,
        image_size: int = 224,
        batch_size: int = 8,
        num_workers: int = 4,
        background: BackgroundMode = "ignore",
        check_data: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, default_batch_size=8, default_workers=4)
        check_choice("data.init_args.background", background, BackgroundMode)
        self.category_split = CategorySplit.named(vocabulary, split, unseen, seen)
        if len(self.category_split.categories) > IGNORE_LABEL - 1:
            raise ConfigError(
                f"data.init_args.vocabulary has {len(self.category_split.categories)} classes; a segmenter's labels are "
                f"8-bit here (up to {IGNORE_LABEL - 1} classes, {IGNORE_LABEL} ignore): give fewer classes"
            )
        self.vocabulary, self.background = vocabulary, background
        self.train_sets, self.val_set_source, self.test_set_source = list(train or []), val, test or val
        self.image_size = image_size
        self.check_data = check_data
        for dataset in [*self.train_sets, val, test]:
            if dataset is not None:
                check_categories(
                    dataset.classes, self.category_split.categories, f"class of {type(dataset).__name__}"
                )

    def training_sets(self) -> list[str]:
        """What the segmenter learns from, for the report: ``real (seen only)``, ``synthetic (mixture)``..."""
        return [s.describe() + (" (seen only)" if s.seen_only else "") for s in self.train_sets]

    def label_of(self, category: str) -> int:
        """The segmenter's label of a category of the vocabulary."""
        return self.category_split.categories.index(category) + (self.background == "class")

    def _lookup(self, dataset: SegmentationSet) -> torch.Tensor:
        """The set's labels (0 background, k = its classes[k - 1]) -> the segmenter's."""
        lookup = torch.full((256,), IGNORE_LABEL, dtype=torch.long)
        lookup[0] = 0 if self.background == "class" else IGNORE_LABEL
        for label, name in enumerate(dataset.classes, 1):
            lookup[label] = self.label_of(name)
        return lookup

    def _samples(self, dataset: SegmentationSet, train: bool) -> SegmentationSamples:
        lookup = self._lookup(dataset)
        indices = list(range(len(dataset)))
        if dataset.seen_only:
            unseen = {self.label_of(c) for c in self.category_split.unseen}
            indices = [i for i in indices if not {int(lookup[k]) for k in dataset.labels_present(i)} & unseen]
            if not indices:
                raise ConfigError(f"{type(dataset).__name__} has no image without unseen classes")
        return SegmentationSamples(dataset, indices, lookup, self.image_size, train)

    def prepare_data(self) -> None:
        # Every file the run will read is checked now, not at the first validation.
        stage = self.trainer.state.fn if self.trainer is not None else "fit"
        sets = {
            "fit": [*self.train_sets, self.val_set_source],
            "validate": [self.val_set_source],
            "test": [self.test_set_source],
        }
        if self.check_data:
            for dataset in sets.get(stage, []):
                if dataset is not None:
                    dataset.validate()

    def setup(self, stage: str) -> None:
        if stage == "fit":
            if not self.train_sets:
                raise ConfigError("fit needs data.init_args.train: at least one segmentation set")
            self.train_set = ConcatDataset([self._samples(s, train=True) for s in self.train_sets])
            if len(self.train_set) < self.batch_size:  # drop_last would leave no training step
                raise ConfigError(
                    f"The training sets hold {len(self.train_set)} usable images, fewer than one batch "
                    f"(data.init_args.batch_size: {self.batch_size}); lower batch_size or add images"
                )
        if stage in ("fit", "validate"):
            if self.val_set_source is None:
                raise ConfigError("set data.init_args.val: the real images to evaluate on")
            self.val_set = self._samples(self.val_set_source, train=False)
        if stage == "test":
            if self.test_set_source is None:
                raise ConfigError("set data.init_args.test (or val): the real images to evaluate on")
            self.test_set = self._samples(self.test_set_source, train=False)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, "train", drop_last=True)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Flipped here, not in the loader's workers: the training process's RNG is what a
        # checkpoint carries, so a resumed fit draws the flips of one never stopped.
        return flip_horizontally(batch) if self.trainer is not None and self.trainer.training else batch

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, "evaluate", collate_evaluation)

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.test_set, "evaluate", collate_evaluation)
