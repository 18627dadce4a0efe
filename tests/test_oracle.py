"""The Mask R-CNN oracle: label mapping, instance selection, RGB input, missing weights."""

import urllib.error

import pytest
import torch
from torch import nn

from grounded_diffusion.data.vocabulary import PASCAL_VOC, SCENES, UnknownCategoryError
from grounded_diffusion.models.backbones import MissingWeightsError
from grounded_diffusion.models.oracle import MaskRCNNOracle

SMALL = {"min_size": 64, "max_size": 64, "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 50}


class FakeDetector(nn.Module):
    """Returns fixed detections and remembers what it was given."""

    def __init__(self, detections):
        super().__init__()
        self.detections, self.inputs = detections, None

    def forward(self, images):
        self.inputs = images
        return self.detections


def box_mask(y0, y1, x0, x1, size=8):
    mask = torch.zeros(1, size, size)
    mask[0, y0:y1, x0:x1] = 0.9
    return mask


@pytest.fixture(scope="module")
def oracle():
    return MaskRCNNOracle(weights=None, score_threshold=0.3, detector_kwargs=SMALL)


def test_union_top1_threshold_and_voc_names(oracle):
    labels = oracle._labels
    couch, dog = labels.index("couch"), labels.index("dog")
    detections = [
        {  # image 0: two sofas (-> COCO 'couch') and a weak dog under the threshold
            "labels": torch.tensor([couch, couch, dog]),
            "scores": torch.tensor([0.9, 0.6, 0.2]),
            "masks": torch.stack([box_mask(0, 2, 0, 2), box_mask(4, 6, 4, 6), box_mask(0, 8, 0, 8)]),
        },
        {
            "labels": torch.tensor([], dtype=torch.long),
            "scores": torch.tensor([]),
            "masks": torch.zeros(0, 1, 8, 8),
        },
    ]
    oracle.model = FakeDetector(detections)
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    images[:, 0] = 255  # pure red: the detector must see RGB in [0, 1], red first
    masks, scores = oracle(images, [["sofa", "dog"], ["sofa"]])
    assert masks.shape == (2, 2, 8, 8) and scores.shape == (2, 2)
    assert masks[0, 0].sum() == 8 and masks[0, 0, 0, 0] and masks[0, 0, 5, 5]  # union of both sofas
    assert scores[0].tolist() == pytest.approx([0.9, 0.0])  # the dog was below the threshold
    assert not masks[0, 1].any() and not masks[1].any() and scores[1].tolist() == [0, 0]
    seen = oracle.model.inputs
    assert seen[0].dtype == torch.float32 and seen[0][0].max() == 1 and seen[0][1:].max() == 0

    oracle.instances = "top1"
    masks, scores = oracle(images, [["sofa", "dog"], ["sofa"]])
    assert masks[0, 0].sum() == 4 and masks[0, 0, 0, 0] and not masks[0, 0, 5, 5]
    oracle.instances = "union"


def test_categories_the_oracle_cannot_label_are_named(oracle):
    oracle.check_categories(PASCAL_VOC)  # every VOC class maps onto a COCO label
    with pytest.raises(UnknownCategoryError, match="cannot label.*'disc'"):
        oracle.check_categories(SCENES)


def test_random_detector_runs_on_a_batch():
    oracle = MaskRCNNOracle(weights=None, score_threshold=0.0, detector_kwargs=SMALL)
    images = torch.randint(0, 255, (2, 3, 48, 48), dtype=torch.uint8)
    masks, scores = oracle(images, [["dog"], ["cat", "person"]])
    assert masks.shape == (2, 2, 48, 48) and masks.dtype == torch.bool
    assert not masks[0, 1].any()  # the empty slot of a one-object sample
    assert not oracle.training and not any(p.requires_grad for p in oracle.parameters())


def test_missing_weights_name_the_enum_and_the_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(MissingWeightsError) as info:
        MaskRCNNOracle(weights="DEFAULT")
    message = str(info.value)
    assert "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1" in message
    assert str(tmp_path / "hub" / "checkpoints" / "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth") in message
