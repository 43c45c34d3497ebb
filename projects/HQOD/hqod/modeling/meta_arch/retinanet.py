"""RetinaNet with the HQOD losses (HQOD Eq. 9 on top of detectron2's RetinaNet losses), or HarDet*."""
import torch
import torch.nn.functional as F
from fvcore.nn import giou_loss, sigmoid_focal_loss, smooth_l1_loss

from detectron2.layers import cat
from detectron2.modeling.meta_arch.build import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.structures import Boxes

from .hqod_mixin import HQODLossMixin, stack_boxes

__all__ = ["HQODRetinaNet"]


@META_ARCH_REGISTRY.register()
class HQODRetinaNet(HQODLossMixin, RetinaNet):
    """
    :class:`RetinaNet` with ``loss_tcorr`` and ``loss_hiou`` (:class:`HQODLossMixin`): p is the
    score of the ground-truth class of each positive anchor (ignored anchors excluded), u the IoU
    of its decoded box with the matched box; the terms are divided by RetinaNet's box-loss
    normalizer, the EMA of the number of positives. ``harmony="hardet"``: HarDet* on the
    positives' focal and box losses (:meth:`positive_losses`). Also built from a yacs config
    (``MODEL.HQOD.*``).
    """

    def positive_losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """
        Each positive anchor's own RetinaNet losses, unreduced, in the order of
        :meth:`harmony_pairs`: ``l_cls`` its focal loss summed over the classes, ``l_reg`` its box
        loss (smooth L1 summed over the 4 deltas, or GIoU) — the terms whose sums over the
        positives RetinaNet's ``loss_cls`` (with the negatives' terms) and ``loss_box_reg`` hold —
        and ``scores``, its per-class sigmoid scores (P, K).
        """
        gt_labels = torch.stack(gt_labels)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        logits = cat(pred_logits, dim=1)[pos_mask]
        target = F.one_hot(gt_labels[pos_mask], num_classes=self.num_classes + 1)[:, :-1].to(logits.dtype)
        l_cls = sigmoid_focal_loss(
            logits, target, alpha=self.focal_loss_alpha, gamma=self.focal_loss_gamma, reduction="none"
        ).sum(dim=1)
        anchors = Boxes.cat(anchors).tensor.unsqueeze(0).expand(len(gt_labels), -1, -1)[pos_mask]
        deltas = cat(pred_anchor_deltas, dim=1)[pos_mask]
        matched = stack_boxes(gt_boxes)[pos_mask].to(deltas.dtype)
        if self.box_reg_loss_type == "smooth_l1":
            target_deltas = self.box2box_transform.get_deltas(anchors, matched)
            l_reg = smooth_l1_loss(deltas, target_deltas, beta=self.smooth_l1_beta, reduction="none").sum(dim=1)
        elif self.box_reg_loss_type == "giou":
            l_reg = giou_loss(self.box2box_transform.apply_deltas(deltas, anchors), matched, reduction="none")
        else:
            raise ValueError(f"HarDet*: box_reg_loss_type {self.box_reg_loss_type!r} (smooth_l1 and giou are supported).")
        return l_cls, l_reg, logits.sigmoid()
