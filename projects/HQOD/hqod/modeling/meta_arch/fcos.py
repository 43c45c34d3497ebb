"""FCOS (and FCOS with the HQOD losses), working on detectron2 v0.6 and main, with or without
instances."""
from typing import List

import torch

from detectron2.modeling.meta_arch.fcos import FCOS as _D2FCOS
from detectron2.structures import Boxes, Instances

from .hqod_mixin import HQODLossMixin

__all__ = ["FCOS", "HQODFCOS"]

# detectron2 main renamed FCOS.match_anchors to _match_anchors, made label_anchors return tensors
# and handle images without instances; v0.6 returns Boxes and crashes on such images.
_FCOS_HANDLES_EMPTY_IMAGES = hasattr(_D2FCOS, "_match_anchors")


class FCOS(_D2FCOS):
    """
    detectron2's :class:`~detectron2.modeling.meta_arch.FCOS`, which also trains on images without
    instances under detectron2 v0.6 (whose FCOS crashes on them; an image can also lose all its
    boxes to augmentation): such images get only background points, as in detectron2 main.
    Otherwise identical (same arguments, outputs and state-dict keys); the configs use it.
    """

    @torch.no_grad()
    def label_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]):
        """
        :meth:`FCOS.label_anchors`, plus images without instances under detectron2 v0.6: their
        points are all background, with zero boxes of the type the installed FCOS returns.
        """
        if _FCOS_HANDLES_EMPTY_IMAGES or all(len(x) > 0 for x in gt_instances):
            return super().label_anchors(anchors, gt_instances)

        nonempty = [i for i, x in enumerate(gt_instances) if len(x) > 0]
        labels, boxes = super().label_anchors(anchors, [gt_instances[i] for i in nonempty])
        labels, boxes = dict(zip(nonempty, labels)), dict(zip(nonempty, boxes))
        anchors = Boxes.cat(anchors)
        gt_labels, matched_gt_boxes = [], []
        for i in range(len(gt_instances)):
            if i in labels:
                gt_labels.append(labels[i])
                matched_gt_boxes.append(boxes[i])
            else:
                gt_labels.append(
                    torch.full(
                        (len(anchors),), self.num_classes, dtype=torch.long, device=self.device
                    )
                )
                matched_gt_boxes.append(Boxes(torch.zeros_like(anchors.tensor)))
        return gt_labels, matched_gt_boxes


class HQODFCOS(HQODLossMixin, FCOS):
    """
    :class:`FCOS` with ``loss_tcorr`` and ``loss_hiou`` (:class:`HQODLossMixin`): p and u for each
    positive point, divided by FCOS's normalizer (EMA of the number of positives, which also
    divides its GIoU loss); not weighted by centerness. Like detectron2's FCOS, it is built from
    keyword arguments only (LazyConfig), not yacs.
    """
