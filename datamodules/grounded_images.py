"""Prompts in, grounded images out: the ``predict`` data of grounded generation and of Protocol II
synthetic datasets (paper §5.2). The GroundingModule generates each image, its trained head
segments every named category, and ``callbacks.grounded_writer.GroundedImageWriter`` writes the
folder (``grounded_diffusion.data.grounded_folder``)."""

from __future__ import annotations

from functools import partial

from torch.utils.data import DataLoader

from datamodules.base import BaseDataModule
from grounded_diffusion.data.grounded_folder import GroundedImageFolder
from grounded_diffusion.data.prompts import PromptList, PromptSet
from grounded_diffusion.data.sources import collate_samples
from grounded_diffusion.data.vocabulary import CategorySplit
from grounded_diffusion.errors import ConfigError, check_in_range
from grounded_diffusion.files import FolderLock


class GroundedImageDataModule(BaseDataModule):
    """
    Args:
        out_dir: the folder the images and masks go to; a rerun resumes it.
        prompts: ``PromptList`` (given prompts and category names) or ``PromptSet`` (prompts
            sampled over a vocabulary: a synthetic segmentation dataset; ``one_seen`` /
            ``two_seen`` counts give one / two objects, both a mixture).
        vocabulary: with a ``PromptSet``, the categories to sample (``pascal``: VOC's 20,
            ``coco``: 80, a classes file or a list of names); its order gives the label ids.
            Every category counts as seen here.
        batch_size / num_workers: per process.
        max_per_group: build at most this many samples per split and group (smoke runs).
    """

    predict_mode = "ground"  # what GroundingModule.predict_step makes of these batches

    def __init__(
        self,
        out_dir: str,
        prompts: PromptList | PromptSet,
        vocabulary: str | list[str] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        max_objects: int = 2,
        max_per_group: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, default_batch_size=8, default_workers=0)
        check_in_range("data.init_args.max_per_group", max_per_group, 1, None)
        self.prepare_data_per_node = False
        if isinstance(prompts, PromptSet):
            if vocabulary is None:
                raise ConfigError(
                    "A PromptSet samples categories from a vocabulary: set data.init_args.vocabulary (pascal, coco)"
                )
            self.category_split = CategorySplit.named(vocabulary)
        else:
            self.category_split = CategorySplit(tuple(prompts.classes))
        prompts.check(self.category_split)
        self.prompts, self.folder = prompts, GroundedImageFolder(out_dir)
        self.lock = FolderLock(out_dir, "The grounded image folder", "data.init_args.out_dir")
        self.max_objects, self.max_per_group = max_objects, max_per_group

    @property
    def classes(self) -> tuple[str, ...]:
        return self.category_split.categories

    def prepare_data(self) -> None:
        self.prompts.prepare()
        self.lock.acquire()  # one build at a time, before repair() clears temporary files
        self.folder.repair()

    def setup(self, stage: str) -> None:
        if stage != "predict":
            raise ConfigError(
                "GroundedImageDataModule feeds `predict` only. To train a segmenter on the folder it "
                "wrote, use datamodules.segmentation.SegmentationDataModule with a FolderSegmentationSet in `train`."
            )
        done = self.folder.manifest.done_ids()
        self.predict_set = self.prompts.dataset(self.category_split, done, self.max_per_group)

    def predict_dataloader(self) -> DataLoader:
        return self.loader(
            self.predict_set, "predict", partial(collate_samples, max_objects=self.max_objects)
        )
