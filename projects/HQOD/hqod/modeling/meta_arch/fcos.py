"""FCOS (and FCOS with the HQOD losses), working on detectron2 v0.6 and main, with or without
instances."""
from typing import List

import torch

from detectron2.modeling.meta_arch.fcos import FCOS as _D2FCOS
from detectron2.structures import Boxes, Instances

from .hqod_mixin import HQODLossMixin, stack_boxes

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
    :class:`FCOS` trained with the HQOD losses: ``loss_tcorr`` (Eq. 5-7) and ``loss_hiou``
    (Eq. 8, times sigma) are added to ``loss_fcos_cls/loc/ctr``.

    p is the sigmoid score of the ground-truth class of each positive point, u the IoU of its
    decoded predicted box with the matched ground-truth box. The terms are summed over the
    positives and divided by FCOS's normalizer (EMA of the number of positives), which also
    divides its GIoU loss; they are not weighted by centerness.

    Also trains on images without instances under detectron2 v0.6 (whose FCOS crashes on them),
    whatever the switches: such images get only background points, as in detectron2 main. With
    ``tcorr=False, hiou=False`` the losses and outputs are otherwise exactly :class:`FCOS`'s.
    Like detectron2's FCOS, it is built from keyword arguments only (LazyConfig), not yacs.
    """

    def __init__(
        self,
        *,
        tcorr: bool = True,
        hiou: bool = True,
        sigma: float = 1.5,
        gamma: float = 0.8,
        **kwargs,
    ):
        """
        Args:
            tcorr (bool): add the Task-Correlated loss (Eq. 7), logged as ``loss_tcorr``.
            hiou (bool): add the Harmonious IoU loss (Eq. 8), logged as ``loss_hiou``.
            sigma (float): weight of the HIoU loss (Eq. 9).
            gamma (float): exponent of the HIoU adaptive weight (Eq. 8).
            kwargs: arguments of :class:`FCOS`.
        """
        super().__init__(**kwargs)
        self._init_hqod(tcorr=tcorr, hiou=hiou, sigma=sigma, gamma=gamma)

    def losses(
        self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness
    ):
        """
        Same arguments as :meth:`FCOS.losses` (``gt_boxes`` are Boxes on v0.6, tensors on main).
        Returns its losses plus ``loss_tcorr`` and ``loss_hiou`` for the enabled switches.
        """
        losses = super().losses(
            anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness
        )
        if not self.hqod_enabled:
            return losses
        # FCOS.losses has just updated its EMA normalizer: reuse it (Eq. 9's 1/P).
        losses.update(
            self.hqod_loss_terms(
                anchors,
                pred_logits,
                pred_anchor_deltas,
                torch.stack(gt_labels),
                stack_boxes(gt_boxes),
                self.loss_normalizer,
            )
        )
        return losses
