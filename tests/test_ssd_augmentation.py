"""SSD's training augmentation (hqod.data.ssd_augmentation): the zoom-out, the min-IoU crop, the
mapper that hands the boxes to them, and the SSD-lite configs that use them on COCO only."""
import os

import numpy as np
import pytest
from fvcore.transforms.transform import CropTransform, NoOpTransform

import detectron2.data.transforms as T
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetMapper
from detectron2.structures import BoxMode

import hqod  # noqa: F401
from hqod.data.ssd_augmentation import DatasetMapperWithBoxes, MinIoURandomCrop, RandomExpand, photometric_distortion

from helpers import ROOT


def iou(a, b):
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = np.prod(np.clip(rb - lt, 0, None))
    return inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)


def test_expand_puts_the_image_on_a_canvas_of_the_fill_colour():
    image = np.full((4, 6, 3), 7, dtype=np.uint8)
    np.random.seed(3)
    aug_input = T.AugInput(image, boxes=np.array([[1.0, 1.0, 3.0, 2.0]]))
    tfm = RandomExpand(max_ratio=3.0, prob=1.0, fill=(1, 2, 3))(aug_input)
    out, (x0, y0) = aug_input.image, (tfm.x0, tfm.y0)
    h, w = out.shape[:2]
    assert 4 <= h <= 12 and 6 <= w <= 18 and (h, w) != (4, 6)
    assert h == 4 + tfm.y0 + tfm.y1 and w == 6 + tfm.x0 + tfm.x1
    assert (out[y0 : y0 + 4, x0 : x0 + 6] == 7).all()
    canvas = np.ones((h, w), dtype=bool)
    canvas[y0 : y0 + 4, x0 : x0 + 6] = False
    assert (out[canvas] == np.array([1, 2, 3], dtype=np.uint8)).all()  # every canvas pixel, per channel
    np.testing.assert_array_equal(aug_input.boxes, [[1 + x0, 1 + y0, 3 + x0, 2 + y0]])


def test_disabled_augmentations_draw_no_random_number():
    """Probability 0 (the digits preset): the data stream is the one without them."""
    image, boxes = np.zeros((20, 30, 3), dtype=np.uint8), np.array([[2.0, 2.0, 10.0, 10.0]])
    np.random.seed(0)
    np.random.uniform()
    _, key, pos, *_ = np.random.get_state()
    augs = T.AugmentationList([photometric_distortion(0.0), RandomExpand(prob=0.0), MinIoURandomCrop(prob=0.0)])
    augs(T.AugInput(image, boxes=boxes))
    _, key_after, pos_after, *_ = np.random.get_state()
    assert (key_after == key).all() and pos_after == pos
    np.random.uniform()  # and the check can fail: a draw moves the generator
    assert np.random.get_state()[2] != pos


def test_min_iou_crop_keeps_its_constraints():
    """A 100 x 120 image with one box: every patch of mode 0.5 has IoU >= 0.5 with it, holds its
    centre, has sides >= 0.3 of the image's and an aspect (h / w) within [0.5, 2]."""
    image, box = np.zeros((100, 120, 3), dtype=np.uint8), np.array([20.0, 30.0, 80.0, 70.0])
    crop = MinIoURandomCrop(modes=(0.5,))
    for seed in range(50):
        np.random.seed(seed)
        tfm = crop.get_transform(image, box[None])
        assert isinstance(tfm, CropTransform)
        patch = np.array([tfm.x0, tfm.y0, tfm.x0 + tfm.w, tfm.y0 + tfm.h], dtype=np.float64)
        assert iou(patch, box) >= 0.5
        assert patch[0] < 50 < patch[2] and patch[1] < 50 < patch[3]
        # (sides truncated to whole pixels: the aspect within 1 pixel of its bounds)
        assert tfm.w >= 0.3 * 120 - 1 and tfm.h >= 0.3 * 100 - 1 and 0.5 - 1 / 36 <= tfm.h / tfm.w <= 2.0 * 36 / 35
        assert patch[2] <= 120 and patch[3] <= 100
    # mode None keeps the image whole; no boxes: no crop; an impossible mode ends whole too
    assert isinstance(MinIoURandomCrop(modes=(None,)).get_transform(image, box[None]), NoOpTransform)
    assert isinstance(crop.get_transform(image, np.zeros((0, 4))), NoOpTransform)
    far_apart = np.array([[0.0, 0.0, 10.0, 10.0], [110.0, 90.0, 120.0, 100.0]])  # no patch has IoU 0.9 with both
    assert isinstance(MinIoURandomCrop(modes=(0.9,), max_modes=3).get_transform(image, far_apart), NoOpTransform)


def test_mapper_hands_the_boxes_to_the_crop(tmp_path):
    from PIL import Image

    path = str(tmp_path / "scene.png")
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (100, 120, 3), dtype=np.uint8)).save(path)
    record = {
        "file_name": path, "height": 100, "width": 120, "image_id": 1,
        "annotations": [
            {"bbox": [20, 30, 60, 40], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 3, "iscrowd": 0},
            {"bbox": [0, 0, 5, 5], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1, "iscrowd": 1},  # crowd: not a box to keep
        ],
    }
    crop = MinIoURandomCrop(modes=(0.5,))
    mapper = DatasetMapperWithBoxes(is_train=True, pre_augmentations=[crop], augmentations=[], image_format="RGB")
    np.random.seed(5)
    out = mapper(record)
    np.random.seed(5)
    tfm = crop.get_transform(np.zeros((100, 120, 3)), np.array([[20.0, 30.0, 80.0, 70.0]]))
    assert tuple(out["image"].shape) == (3, tfm.h, tfm.w)
    expected = np.clip(np.array([20.0, 30.0, 80.0, 70.0]) - [tfm.x0, tfm.y0, tfm.x0, tfm.y0], 0, [tfm.w, tfm.h, tfm.w, tfm.h])
    np.testing.assert_allclose(out["instances"].gt_boxes.tensor.numpy(), [expected], atol=1e-4)
    assert out["instances"].gt_classes.tolist() == [3]
    # the same mapper without box-aware augmentations maps as detectron2's
    plain = dict(is_train=True, augmentations=[T.ResizeShortestEdge(64, max_size=200)], image_format="RGB")
    a, b = DatasetMapperWithBoxes(**plain)(record), DatasetMapper(**plain)(record)
    assert (a["image"] == b["image"]).all() and (a["instances"].gt_boxes.tensor == b["instances"].gt_boxes.tensor).all()


@pytest.mark.parametrize("dataset, probs", [("coco", (0.5, 0.5, 1.0)), ("voc", (0.5, 0.5, 1.0)), ("digits", (0.0, 0.0, 0.0))])
def test_ssdlite_configs_use_ssd_augmentation_on_real_data(dataset, probs):
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/ssdlite_mv2_lsq_w4_hqod.py"))
    cfg = LazyConfig.apply_overrides(cfg, [f"dataloader.dataset={dataset}"])
    mapper = instantiate(cfg.dataloader.train.mapper)
    assert isinstance(mapper, DatasetMapperWithBoxes)
    photometric, expand, crop = mapper.pre_augmentations.augs
    resize, _flip = mapper.augmentations.augs  # the resize first, as in every config
    assert len(photometric.augs) == (3 if probs[0] else 0)
    assert all(a.prob == probs[0] for a in photometric.augs)
    assert (expand.prob, crop.prob) == probs[1:]
    assert expand.fill == [123.675, 116.28, 103.53]  # SSD-lite's pixel mean (RGB)
    assert isinstance(resize, T.ResizeShortestEdge)
