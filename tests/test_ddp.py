"""Two CPU processes (gloo) give the same evaluation numbers as one, and shard training (also
when resumed)."""

import math
import os

import pytest
import torch
from lightning import Callback, Trainer, seed_everything
from lightning.fabric.utilities.distributed import _suggested_max_num_threads
from torch.utils.data import DistributedSampler

from callbacks.last_checkpoint import LastCheckpoint
from datamodules.triplets import TripletDataModule
from grounded_diffusion.models.grounding_head import HeadConfig
from lightning_modules.grounding import GroundingModule

pytestmark = pytest.mark.workflow  # runs the CLI or a whole workflow: `make test`, not `make test-fast`


def small_run(cache_dir, devices, **trainer_args):
    seed_everything(0)
    model = GroundingModule(
        head=HeadConfig(group_channels=[16, 16, 8, 8], embed_dim=32, num_heads=4, ffn_dim=64)
    )
    data = TripletDataModule(cache_dir, vocabulary="scenes", split=1, batch_size=2)
    trainer_args = {"enable_checkpointing": False, **trainer_args}
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_args,
    )
    return model, data, trainer


def evaluate(cache_dir, devices, stage="validate"):
    """Every run computes with the threads of one of 2 spawned ranks (Lightning gives each half
    the cores): a convolution's float sums can depend on the thread count (torch 2.11's do), and
    a pixel at the mask threshold would then flip."""
    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:  # as Lightning's spawned ranks: they keep it when set
        torch.set_num_threads(_suggested_max_num_threads(num_processes=2))
    try:
        model, data, trainer = small_run(cache_dir, devices)
        return getattr(trainer, stage)(model, data)[0]
    finally:
        torch.set_num_threads(threads)


def test_two_process_validation_equals_one_process(scene_cache):
    cache_dir = str(next(scene_cache.glob("cache-*")))
    single = evaluate(cache_dir, devices=1)
    double = evaluate(cache_dir, devices=2)
    iou_keys = [k for k in single if k.startswith("val/iou/") or k.endswith("miou")]
    assert len(iou_keys) == 8 + 4
    for key in iou_keys:
        a, b = single[key], double[key]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9), key
    assert torch.isfinite(torch.tensor(single["val/seen_miou"]))


def test_two_process_test_equals_one_process_per_group_with_daam(scene_cache):
    """Table-1 numbers (ours and DAAM, per group, both metrics) do not depend on the process count."""
    cache_dir = str(next(scene_cache.glob("cache-*")))
    single = evaluate(cache_dir, devices=1, stage="test")
    double = evaluate(cache_dir, devices=2, stage="test")
    keys = [k for k in single if k.startswith(("test/ours/", "test/daam/"))]
    assert set(keys) == {k for k in double if k.startswith(("test/ours/", "test/daam/"))}
    base = [k for k in keys if not k.endswith("on_other_object")]
    assert len(base) == 2 * 6 * 3  # methods x (5 groups + all) x (miou, image_noun_miou, objects scored)
    assert "test/ours/all/on_other_object" in keys  # the scenes have images of two objects
    assert not math.isnan(single["test/daam/all/miou"])
    for key in keys:
        a, b = single[key], double[key]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9), key


class RecordTrainingIds(Callback):
    """Each rank appends the ids of its training batches to ``rank<r>.txt`` (spawned processes
    return nothing else)."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(self.folder / f"rank{trainer.global_rank}.txt", "a") as handle:
            handle.writelines(f"{i}\n" for i in batch["id"])


def shard_batches(dataset, rank: int, epochs: int, batch_size: int = 2) -> list[list[str]]:
    """Rank ``rank``'s training batches of 2 processes, epoch after epoch: DistributedSampler's
    order for seed 0, as Lightning would shard a plain shuffled loader."""
    order = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
    batches = []
    for epoch in range(epochs):
        order.set_epoch(epoch)
        ids = [dataset.records[i]["id"] for i in order]
        batches += [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    return batches


def test_two_process_fit_stopped_and_resumed_trains_each_rank_on_its_shard_of_the_seeded_order(
    scene_cache, tmp_path
):
    """Each rank keeps our sampler (a DistributedSampler), which also resumes mid-epoch."""
    cache_dir = str(next(scene_cache.glob("cache-*")))
    for steps, ckpt_path in ((2, None), (5, str(tmp_path / "last.ckpt"))):
        callbacks = [RecordTrainingIds(tmp_path), LastCheckpoint(str(tmp_path))]
        model, data, trainer = small_run(
            cache_dir, 2, max_steps=steps, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=True
        )
        trainer.fit(model, data, ckpt_path=ckpt_path)
    data.setup("fit")
    for rank in range(2):
        assert (
            2 < len(shard_batches(data.train_set, rank, epochs=1)) < 5
        )  # stopped mid-epoch, resumed into the 2nd
        expected = shard_batches(data.train_set, rank, epochs=2)[:5]
        assert (tmp_path / f"rank{rank}.txt").read_text().split() == sum(expected, [])
