import math

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassJaccardIndex

from grounded_diffusion.data.vocabulary import CategorySplit
from grounded_diffusion.losses import grounding_loss
from grounded_diffusion.metrics import CategoryIoU, harmonic_mean, summarize_iou


def masks_from(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_iou_is_summed_over_the_set_then_divided():
    # Two images of category 0 on a 1x4 "image": per-image IoUs are 1/1 and 1/3 (mean 2/3),
    # but the set-level IoU is (1+1)/(1+3) = 1/2. Category 1 appears once: IoU 2/3.
    preds = masks_from([[[[1, 0, 0, 0]], [[0, 0, 0, 0]]], [[[1, 1, 1, 0]], [[1, 1, 0, 0]]]])
    target = masks_from([[[[1, 0, 0, 0]], [[0, 0, 0, 0]]], [[[1, 0, 0, 0]], [[1, 1, 1, 0]]]])
    categories = torch.tensor([[0, -1], [0, 1]])
    metric = CategoryIoU(3)
    metric.update(preds, target, categories)
    iou = metric.compute()
    assert iou[0].item() == 0.5
    assert math.isclose(iou[1].item(), 2 / 3)
    assert math.isnan(iou[2].item())  # never seen: left out of means


def test_single_object_iou_matches_torchmetrics_jaccard():
    # With one object per image, the object mask is a 2-class (background / category) map, so
    # torchmetrics' class-wise Jaccard over the set must give the same foreground IoU.
    g = torch.Generator().manual_seed(0)
    preds = torch.rand(6, 1, 16, 16, generator=g) > 0.5
    target = torch.rand(6, 1, 16, 16, generator=g) > 0.6
    ours = CategoryIoU(1)
    ours.update(preds, target, torch.zeros(6, 1, dtype=torch.long))
    reference = MulticlassJaccardIndex(num_classes=2, average=None)
    reference.update(preds.long().flatten(), target.long().flatten())
    torch.testing.assert_close(ours.compute().reshape(-1)[0].float(), reference.compute()[1])
    assert summarize_iou(ours.compute(), CategorySplit(("x",)))["per_category"]["x"] > 0


def test_summary_seen_unseen_harmonic():
    split = CategorySplit(("a", "b", "c", "d"), unseen=("c", "d"))
    summary = summarize_iou(torch.tensor([0.8, 0.6, 0.3, math.nan], dtype=torch.float64), split)
    assert math.isclose(summary["seen_miou"], 70.0)
    assert math.isclose(summary["unseen_miou"], 30.0)
    assert math.isclose(summary["harmonic_miou"], 2 * 70 * 30 / 100)
    assert math.isnan(summary["per_category"]["d"])
    assert math.isnan(harmonic_mean(50.0, math.nan))


def test_loss_without_zero_masks_skips_empty_and_padding_slots():
    logits = torch.tensor([[[[2.0, -1.0]], [[0.5, 0.5]]], [[[1.0, 1.0]], [[-3.0, 4.0]]]])
    masks = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]], [[[0.0, 1.0]], [[1.0, 1.0]]]])
    categories = torch.tensor([[3, 5], [2, -1]])
    # Normal training: slots (0,0), (0,1), (1,0); without zero masks: (0,1) is empty -> dropped.
    normal = F.binary_cross_entropy_with_logits(
        torch.tensor([2.0, -1.0, 0.5, 0.5, 1.0, 1.0]), torch.tensor([1.0, 0, 0, 0, 0, 1])
    )
    no_zero = F.binary_cross_entropy_with_logits(
        torch.tensor([2.0, -1.0, 1.0, 1.0]), torch.tensor([1.0, 0, 0, 1])
    )
    torch.testing.assert_close(grounding_loss(logits, masks, categories, ignore_zero_masks=False), normal)
    torch.testing.assert_close(grounding_loss(logits, masks, categories, ignore_zero_masks=True), no_zero)


def test_loss_with_nothing_to_learn_is_zero_but_differentiable():
    logits = torch.zeros(1, 1, 2, 2, requires_grad=True)
    loss = grounding_loss(logits, torch.zeros(1, 1, 2, 2), torch.tensor([[0]]), ignore_zero_masks=True)
    loss.backward()
    assert loss.item() == 0 and logits.grad is not None


def test_image_noun_miou_averages_pairs_and_grouped_iou_splits_by_group():
    """The hand-computed case above: pairs (image 0, cat 0) IoU 1, (image 1, cat 0) IoU 1/3,
    (image 1, cat 1) IoU 2/3 -> DAAM's mean over pairs 2/3; class-averaged mIoU (1/2 + 2/3) / 2."""
    from grounded_diffusion.metrics import GroupedIoU, ImageNounIoU

    preds = masks_from([[[[1, 0, 0, 0]], [[0, 0, 0, 0]]], [[[1, 1, 1, 0]], [[1, 1, 0, 0]]]])
    target = masks_from([[[[1, 0, 0, 0]], [[0, 0, 0, 0]]], [[[1, 0, 0, 0]], [[1, 1, 1, 0]]]])
    categories = torch.tensor([[0, -1], [0, 1]])
    pairs = ImageNounIoU()
    pairs.update(preds, target, categories)
    assert math.isclose(pairs.compute().item(), (1 + 1 / 3 + 2 / 3) / 3, rel_tol=1e-6)  # DAAM adds 1e-8 to U

    split = CategorySplit(("a", "b", "c"), unseen=("b",))
    grouped = GroupedIoU(3, ["ours"])
    grouped.update("ours", preds, target, categories, groups=["one_seen", "two_seen_unseen"])
    table = grouped.compute(split)["ours"]
    assert math.isclose(table["all"]["miou"], 100 * (1 / 2 + 2 / 3) / 2)
    assert math.isclose(table["all"]["image_noun_miou"], 100 * 2 / 3, rel_tol=1e-6)
    assert table["one_seen"]["miou"] == 100 and math.isclose(
        table["one_seen"]["image_noun_miou"], 100, rel_tol=1e-6
    )
    assert math.isclose(table["two_seen_unseen"]["miou"], 100 * (1 / 3 + 2 / 3) / 2)
    assert math.isnan(table["two_unseen"]["miou"]) and math.isnan(table["two_unseen"]["image_noun_miou"])


def test_share_on_the_other_object_counts_only_images_with_another_object():
    """By hand, on 1x4 images. Image A (masks overlap at pixel 0): object 0's other object covers
    pixels 1-2 outside its own truth, and it predicts 3 pixels, 2 of them there; object 1 has no
    pixel of another object outside its own truth, so it does not count. Image B: object 0
    predicts all 4 pixels, 2 on object 1; object 1 predicts 1 pixel, on itself. Image C holds one
    object: not counted. Share (2 + 2 + 0) / (3 + 4 + 1) = 1/2; without B's object 1, 4/7."""
    from grounded_diffusion.metrics import GroupedIoU, OtherObjectShare

    preds = masks_from(
        [[[[1, 1, 1, 0]], [[1, 1, 0, 0]]], [[[1, 1, 1, 1]], [[0, 0, 1, 0]]], [[[1, 1, 1, 1]], [[0, 0, 0, 0]]]]
    )
    target = masks_from(
        [[[[1, 0, 0, 0]], [[1, 1, 1, 0]]], [[[1, 1, 0, 0]], [[0, 0, 1, 1]]], [[[1, 0, 0, 0]], [[0, 0, 0, 0]]]]
    )
    categories = torch.tensor([[0, 1], [1, 2], [0, -1]])
    share = OtherObjectShare()
    share.update(preds, target, categories)
    assert share.compute().item() == 1 / 2
    share.reset()
    share.update(preds, target, torch.tensor([[0, 1], [1, -1], [0, -1]]))  # B's object 1 not scored
    assert math.isclose(share.compute().item(), 4 / 7)

    grouped = GroupedIoU(3, ["ours"])
    grouped.update("ours", preds, target, categories, groups=["two_seen", "two_seen", "one_seen"])
    table = grouped.compute(CategorySplit(("a", "b", "c"), unseen=("c",)))["ours"]
    assert table["two_seen"]["on_other_object"] == 50 and table["all"]["on_other_object"] == 50
    assert math.isnan(table["one_seen"]["on_other_object"])  # no image there has another object


def test_pair_confusion_counts_each_category_pair_in_both_directions():
    """The hand-computed case above, per pair: category 0 with 1 (image A) puts 2 of 3 pixels on
    the other; 1 with 2 (image B) 2 of 4, and 2 with 1 none of 1: the pair 1 + 2, 2 of 5."""
    from grounded_diffusion.metrics import PairConfusion, confused_pairs

    preds = masks_from(
        [[[[1, 1, 1, 0]], [[1, 1, 0, 0]]], [[[1, 1, 1, 1]], [[0, 0, 1, 0]]], [[[1, 1, 1, 1]], [[0, 0, 0, 0]]]]
    )
    target = masks_from(
        [[[[1, 0, 0, 0]], [[1, 1, 1, 0]]], [[[1, 1, 0, 0]], [[0, 0, 1, 1]]], [[[1, 0, 0, 0]], [[0, 0, 0, 0]]]]
    )
    categories = torch.tensor([[0, 1], [1, 2], [0, -1]])
    pairs = PairConfusion(3)
    pairs.update(preds, target, categories, categories)
    on_other, predicted = pairs.compute()
    assert on_other.tolist() == [[0, 2, 0], [0, 0, 2], [0, 0, 0]]
    assert predicted.tolist() == [[0, 3, 0], [0, 0, 4], [0, 1, 0]]
    table = {tuple(row["pair"]): row for row in confused_pairs(pairs.compute(), ["a", "b", "c"])}
    assert set(table) == {("a", "b"), ("b", "c")}
    assert (
        math.isclose(table["a", "b"]["on_other_object"], 200 / 3) and table["b", "c"]["on_other_object"] == 40
    )
    assert (table["b", "c"]["on_other_pixels"], table["b", "c"]["predicted_pixels"]) == (2, 5)

    pairs.reset()  # B's object 1 not scored: it still counts as the other object of object 0
    pairs.update(preds, target, torch.tensor([[0, 1], [1, -1], [0, -1]]), categories)
    assert pairs.compute()[1].tolist() == [[0, 3, 0], [0, 0, 4], [0, 0, 0]]


def test_daam_masks_normalise_each_map_then_threshold():
    from grounded_diffusion.models.daam import daam_masks

    # A 2x2 map already at image size: bicubic is the identity, min-max gives (v - 1) / 3.
    heat = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 5.0], [5.0, 9.0]]]])
    masks = daam_masks(heat, (2, 2), threshold=0.4)
    assert masks[0, 0].tolist() == [[False, False], [True, True]]  # 0, 1/3, 2/3, 1
    assert masks[0, 1].tolist() == [[False, False], [False, True]]  # each map on its own scale
