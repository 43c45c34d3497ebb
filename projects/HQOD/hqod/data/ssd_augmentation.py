"""
SSD's training augmentation (Liu et al., ECCV 2016, Sec. 2.2 "Data augmentation"), as the HQOD
authors train SSD-lite (../shared/notes/lightweight-detectors.md): photometric distortion,
zoom-out onto a canvas of the mean colour up to 4x the image, and a random crop whose IoU with
every object is at least a sampled minimum, before the resize and the flip.

detectron2 ``Augmentation``s; the crop reads the ground-truth boxes, which detectron2's
``DatasetMapper`` does not hand to its augmentations: :class:`DatasetMapperWithBoxes` does.
"""
import copy
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from fvcore.transforms.transform import CropTransform, NoOpTransform, PadTransform

import detectron2.data.transforms as T
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.structures import Boxes, BoxMode, pairwise_iou

__all__ = ["DatasetMapperWithBoxes", "ExpandTransform", "MinIoURandomCrop", "RandomExpand", "photometric_distortion"]


class ExpandTransform(PadTransform):
    """fvcore's :class:`PadTransform` with a fill value per channel (``pad_value``: a scalar or
    one value per channel)."""

    def apply_image(self, img):
        h, w = img.shape[:2]
        out = np.empty((self.y0 + h + self.y1, self.x0 + w + self.x1) + img.shape[2:], dtype=img.dtype)
        out[...] = np.asarray(self.pad_value, dtype=img.dtype)
        out[self.y0 : self.y0 + h, self.x0 : self.x0 + w] = img
        return out


class RandomExpand(T.Augmentation):
    """SSD's zoom-out: with probability ``prob``, the image placed at a random position of a
    canvas ``r`` times its size, ``r`` uniform in [1, ``max_ratio``], filled with ``fill``
    (``prob`` 0: no random number drawn, the data stream as without it)."""

    def __init__(self, *, max_ratio: float = 4.0, prob: float = 0.5, fill: Sequence[float] = (123.675, 116.28, 103.53)):
        super().__init__()
        if max_ratio < 1:
            raise ValueError(f"RandomExpand: max_ratio must be >= 1, got {max_ratio}.")
        self._init(locals())

    def get_transform(self, image):
        if self.prob <= 0 or self._rand_range() >= self.prob:
            return NoOpTransform()
        h, w = image.shape[:2]
        ratio = self._rand_range(1.0, self.max_ratio)
        left, top = int(self._rand_range(0, w * ratio - w)), int(self._rand_range(0, h * ratio - h))
        right, bottom = int(w * ratio) - w - left, int(h * ratio) - h - top
        return ExpandTransform(left, top, right, bottom, orig_w=w, orig_h=h, pad_value=tuple(self.fill))


class MinIoURandomCrop(T.Augmentation):
    """
    SSD's patch sampling, with probability ``prob`` (1: always, the authors'; 0: never, no random
    number drawn): a mode is drawn from ``modes`` — ``None`` keeps the whole image, a number
    is the least IoU the patch must have with every ground-truth box (0: any patch) — then up to
    ``max_trials`` patches of sides uniform in [``min_crop_size``, 1] of the image's, aspect
    (height / width) in ``aspect_range``, at a uniform position, until one has that IoU with every
    box and holds at least one box centre; when none does, another mode is drawn (the whole image
    after ``max_modes`` modes without a patch). Images without boxes are kept whole. Boxes are
    clipped to the patch by detectron2's annotation transform (those left empty are dropped),
    where the authors' code drops a box whose centre is outside.
    """

    input_args = ("image", "boxes")

    def __init__(
        self,
        *,
        modes: Sequence[Optional[float]] = (None, 0.1, 0.3, 0.5, 0.7, 0.9, 0.0),
        min_crop_size: float = 0.3,
        aspect_range: Tuple[float, float] = (0.5, 2.0),
        max_trials: int = 50,
        max_modes: int = 100,
        prob: float = 1.0,
    ):
        super().__init__()
        if not modes or not 0 < min_crop_size <= 1:
            raise ValueError(f"MinIoURandomCrop: give at least one mode and 0 < min_crop_size <= 1 (got {modes}, {min_crop_size}).")
        self._init(locals())

    def get_transform(self, image, boxes):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if len(boxes) == 0 or self.prob <= 0 or (self.prob < 1 and self._rand_range() >= self.prob):
            return NoOpTransform()
        h, w = image.shape[:2]
        gt, centres = Boxes(torch.from_numpy(boxes)), (boxes[:, :2] + boxes[:, 2:]) / 2
        for _ in range(self.max_modes):
            min_iou = self.modes[np.random.randint(len(self.modes))]
            if min_iou is None:
                return NoOpTransform()
            for _ in range(self.max_trials):
                cw, ch = self._rand_range(self.min_crop_size * w, w), self._rand_range(self.min_crop_size * h, h)
                if not self.aspect_range[0] <= ch / cw <= self.aspect_range[1]:
                    continue
                x0, y0 = int(self._rand_range(0, w - cw)), int(self._rand_range(0, h - ch))
                crop = np.array([x0, y0, x0 + int(cw), y0 + int(ch)], dtype=np.float64)
                if crop[2] <= crop[0] or crop[3] <= crop[1]:
                    continue
                if pairwise_iou(Boxes(torch.from_numpy(crop[None])), gt).min() < min_iou:  # every box
                    continue
                inside = (centres > crop[:2]).all(axis=1) & (centres < crop[2:]).all(axis=1)
                if inside.any():
                    return CropTransform(x0, y0, int(cw), int(ch), orig_w=w, orig_h=h)
        return NoOpTransform()


def photometric_distortion(prob: float = 0.5) -> T.AugmentationList:
    """SSD's photometric distortion with detectron2's augmentations, each applied with
    probability ``prob`` (0: none, no random number drawn): brightness x [0.75, 1.25] (the
    authors' +-32 of 255, about +-25 % at a mid-grey mean), contrast and saturation x [0.5, 1.5].
    Their hue shift (+-18 degrees) has no detectron2 augmentation and is left out."""
    changes = [T.RandomBrightness(0.75, 1.25), T.RandomContrast(0.5, 1.5), T.RandomSaturation(0.5, 1.5)]
    return T.AugmentationList([T.RandomApply(change, prob=prob) for change in changes] if prob > 0 else [])


class DatasetMapperWithBoxes(DatasetMapper):
    """
    detectron2's :class:`DatasetMapper` with ``pre_augmentations`` applied before its
    ``augmentations`` at training time, SSD's zoom-out and crop, which come before the resize
    (``augmentations`` keeps the resize first, as in every config). All of them receive the
    image's ground-truth boxes (``boxes``: XYXY_ABS, crowd boxes left out), which box-aware
    augmentations such as :class:`MinIoURandomCrop` read. Detection only: masks, keypoints,
    semantic maps and precomputed proposals are not supported. At test time it is detectron2's
    mapper.
    """

    @configurable
    def __init__(self, is_train: bool, *, pre_augmentations: Sequence[T.Augmentation] = (), **kwargs):
        super().__init__(is_train, **kwargs)
        self.pre_augmentations = T.AugmentationList(list(pre_augmentations))

    def __call__(self, dataset_dict):
        if not self.is_train:
            return super().__call__(dataset_dict)
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        annotations = [a for a in dataset_dict.get("annotations", []) if a.get("iscrowd", 0) == 0]
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
        aug_input = T.AugInput(image, boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
        transforms = T.TransformList([self.pre_augmentations(aug_input), self.augmentations(aug_input)])
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image.shape[:2])
        return dataset_dict
