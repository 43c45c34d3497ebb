"""
YOLOX (Ge et al., 2021) in its tiny form, and YOLOX with the HQOD losses: a decoupled head per
level with objectness, SimOTA label assignment, BCE class (IoU-valued targets) and objectness
losses, the squared-IoU box loss. Facts of the HQOD authors' YOLOX-tiny:
../shared/notes/lightweight-detectors.md.

The priors are detectron2 anchors of one stride-sized square per location, centred on the grid
points ``(i, j) * stride`` (offset 0), so that YOLOX's box decoding (centre ``prior + d * stride``,
size ``exp(d) * stride``) is detectron2's :class:`Box2BoxTransform` with unit weights, and the
HQOD mixin decodes the positives as it does for RetinaNet.
"""
import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.layers import Conv2d, ShapeSpec, cat
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage

from ...losses import aligned_box_iou
from ..cspdarknet import conv_bn_silu
from ..dense_head import dense_head
from .hqod_mixin import HQODLossMixin

__all__ = ["YOLOX", "HQODYOLOX", "YOLOXHead", "simota_assign"]


@dense_head(predictors={"cls_score": "cls_convs", "bbox_pred": "reg_convs", "objectness": "reg_convs"}, shared=False)
class YOLOXHead(nn.Module):
    """
    YOLOX's decoupled head, one per level (nothing shared): a class branch and a box branch of
    ``num_convs`` 3x3 convs (BN, SiLU) each, then 1x1 predictors of the class logits (from the
    class branch), the 4 box deltas and the objectness logit (from the box branch).
    """

    def __init__(self, *, input_shape: List[ShapeSpec], num_classes: int, conv_dims: int, num_convs: int = 2,
                 prior_prob: float = 0.01, norm="BN"):
        super().__init__()

        def branch(c):
            return nn.Sequential(*(conv_bn_silu(c if i == 0 else conv_dims, conv_dims, 3, norm=norm) for i in range(num_convs)))

        channels = [s.channels for s in input_shape]
        self.cls_convs = nn.ModuleList(branch(c) for c in channels)
        self.reg_convs = nn.ModuleList(branch(c) for c in channels)
        self.cls_score = nn.ModuleList(Conv2d(conv_dims, num_classes, 1) for _ in channels)
        self.bbox_pred = nn.ModuleList(Conv2d(conv_dims, 4, 1) for _ in channels)
        self.objectness = nn.ModuleList(Conv2d(conv_dims, 1, 1) for _ in channels)
        bias = -math.log((1 - prior_prob) / prior_prob)  # initial scores at prior_prob
        for conv in [*self.cls_score, *self.objectness]:
            nn.init.constant_(conv.bias, bias)

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Per level (N, K, H, W) class logits, (N, 4, H, W) deltas, (N, 1, H, W) objectness."""
        cls = [tower(f) for f, tower in zip(features, self.cls_convs)]
        reg = [tower(f) for f, tower in zip(features, self.reg_convs)]
        return (
            [p(x) for p, x in zip(self.cls_score, cls)],
            [p(x) for p, x in zip(self.bbox_pred, reg)],
            [p(x) for p, x in zip(self.objectness, reg)],
        )


@torch.no_grad()
def simota_assign(
    scores: Tensor, centers: Tensor, strides: Tensor, pred_boxes: Tensor, gt_boxes: Tensor, gt_classes: Tensor, *,
    num_classes: int, center_radius: float = 2.5, candidate_topk: int = 10, iou_weight: float = 3.0, cls_weight: float = 1.0,
) -> Tuple[Tensor, Tensor]:
    """
    SimOTA (YOLOX Sec. 2.2) for one image.

    Args:
        scores: (R, K) predicted probabilities (class sigmoid x objectness sigmoid).
        centers: (R, 2) the priors' cell centres; strides: (R,) their strides.
        pred_boxes: (R, 4) decoded predictions; gt_boxes: (G, 4); gt_classes: (G,).

    Candidates are the priors whose centre lies in a ground-truth box or within
    ``center_radius`` strides of its centre. Cost of a (candidate, ground truth) pair:
    ``cls_weight x BCE(sqrt(score), one-hot class) + iou_weight x -log(IoU + 1e-7)``, plus 1e5
    unless the centre is both in the box and in its centre region. Each ground truth takes its
    ``k`` cheapest candidates, k = the sum of its ``candidate_topk`` largest IoUs (at least 1); a
    prior taken by several keeps the cheapest.

    Returns:
        (R,) the index of each prior's ground truth (-1: background) and (R,) the IoU of its
        prediction with it (0 for background).
    """
    num_priors, num_gt = len(centers), len(gt_boxes)
    matched = torch.full((num_priors,), -1, dtype=torch.long, device=centers.device)
    matched_ious = centers.new_zeros(num_priors)
    if num_gt == 0 or num_priors == 0:
        return matched, matched_ious
    cx, cy = centers[:, 0:1], centers[:, 1:2]  # (R, 1)
    in_box = torch.stack([cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx, gt_boxes[:, 3] - cy], -1).min(-1).values > 0
    gt_cx, gt_cy = (gt_boxes[:, 0] + gt_boxes[:, 2]) / 2, (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2
    radius = center_radius * strides[:, None]
    in_center = torch.stack([cx - (gt_cx - radius), cy - (gt_cy - radius), gt_cx + radius - cx, gt_cy + radius - cy], -1).min(-1).values > 0
    valid = in_box.any(1) | in_center.any(1)
    if not valid.any():
        return matched, matched_ious
    ious = pairwise_iou(Boxes(pred_boxes[valid]), Boxes(gt_boxes))  # (V, G)
    onehot = F.one_hot(gt_classes, num_classes).to(scores.dtype)  # (G, K)
    probs = scores[valid].float().sqrt()[:, None, :].expand(-1, num_gt, -1)
    cls_cost = F.binary_cross_entropy(probs, onehot[None].expand_as(probs), reduction="none").sum(-1)
    cost = cls_weight * cls_cost + iou_weight * -torch.log(ious + 1e-7) + 1e5 * ~(in_box[valid] & in_center[valid])

    matching = torch.zeros_like(cost)
    dynamic_ks = ious.topk(min(candidate_topk, len(ious)), dim=0).values.sum(0).int().clamp(min=1)
    for g in range(num_gt):
        matching[cost[:, g].topk(int(dynamic_ks[g]), largest=False).indices, g] = 1
    several = matching.sum(1) > 1
    if several.any():
        matching[several] = 0
        matching[several, cost[several].argmin(1)] = 1
    foreground = matching.sum(1) > 0
    index = valid.nonzero().squeeze(1)[foreground]
    matched[index] = matching[foreground].argmax(1)
    matched_ious[index] = (matching * ious).sum(1)[foreground]
    return matched, matched_ious


class YOLOX(DenseDetector):
    """
    YOLOX: per level class logits, box deltas and objectness on the priors (one per location);
    SimOTA assigns the ground truths; losses, each summed and divided by the number of positives
    (the mean over processes, at least 1):

    * ``loss_cls``: BCE of the positives' class logits against the one-hot class times the IoU of
      their prediction with the assigned box;
    * ``loss_box_reg``: ``box_loss_weight`` x (1 - IoU^2) of the positives' decoded boxes;
    * ``loss_obj``: BCE of every prior's objectness against 1 for positives, 0 otherwise;
    * ``loss_l1`` (``l1_loss_weight`` > 0; the authors' last epochs): L1 of the positives'
      deltas against the assigned boxes' (log-size with eps 1e-8).

    Inference: score = class sigmoid x objectness sigmoid, the best class per prior, threshold,
    per-class NMS. Built from keyword arguments (LazyConfig), like detectron2's FCOS.
    """

    def __init__(
        self,
        *,
        backbone,
        head: nn.Module,
        head_in_features=None,
        anchor_generator: nn.Module,
        box2box_transform,
        num_classes: int,
        center_radius: float = 2.5,
        candidate_topk: int = 10,
        iou_cost_weight: float = 3.0,
        cls_cost_weight: float = 1.0,
        box_loss_weight: float = 5.0,
        l1_loss_weight: float = 0.0,
        test_score_thresh: float = 0.01,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.65,
        max_detections_per_image: int = 100,
        pixel_mean,
        pixel_std,
        input_format: str = "RGB",
    ):
        super().__init__(backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std)
        self.num_classes = num_classes
        self.anchor_generator = anchor_generator
        self.box2box_transform = box2box_transform
        self.center_radius = center_radius
        self.candidate_topk = candidate_topk
        self.iou_cost_weight = iou_cost_weight
        self.cls_cost_weight = cls_cost_weight
        self.box_loss_weight = box_loss_weight
        self.l1_loss_weight = l1_loss_weight
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.input_format = input_format

    def forward_training(self, images, features, predictions, gt_instances):
        pred_logits, pred_deltas, pred_obj = self._transpose_dense_predictions(predictions, [self.num_classes, 4, 1])
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes, gt_ious = self.label_anchors(anchors, pred_logits, pred_deltas, pred_obj, gt_instances)
        return self.losses(anchors, pred_logits, gt_labels, pred_deltas, gt_boxes, pred_obj, gt_ious)

    @torch.no_grad()
    def label_anchors(self, anchors: List[Boxes], pred_logits, pred_deltas, pred_obj, gt_instances: List[Instances]):
        """
        SimOTA on each image's current predictions (:func:`simota_assign`; the priors' centres
        are their cells' centres, half a stride from the grid points).

        Returns:
            per image (R,) labels (the class; ``num_classes`` for background), (R, 4) assigned
            boxes (zeros for background) and (R,) IoUs of the predictions with them.
        """
        anchors = Boxes.cat(anchors).tensor
        strides = anchors[:, 2] - anchors[:, 0]
        centers = (anchors[:, :2] + anchors[:, 2:]) / 2 + strides[:, None] / 2
        logits, deltas, obj = (cat(x, dim=1).float() for x in (pred_logits, pred_deltas, pred_obj))
        if not (torch.isfinite(logits).all() and torch.isfinite(obj).all()):
            raise FloatingPointError("YOLOX: the predictions are infinite or NaN: training has diverged (lower the learning rate).")
        gt_labels, gt_boxes, gt_ious = [], [], []
        for i, inst in enumerate(gt_instances):
            scores = logits[i].sigmoid() * obj[i].sigmoid()
            boxes = self.box2box_transform.apply_deltas(deltas[i], anchors)
            with torch.autocast(anchors.device.type, enabled=False):  # BCE is not autocast-safe
                matched, ious = simota_assign(
                    scores, centers, strides, boxes, inst.gt_boxes.tensor, inst.gt_classes, num_classes=self.num_classes,
                    center_radius=self.center_radius, candidate_topk=self.candidate_topk,
                    iou_weight=self.iou_cost_weight, cls_weight=self.cls_cost_weight,
                )
            foreground = matched >= 0
            labels = torch.full_like(matched, self.num_classes)
            assigned = torch.zeros_like(anchors)
            labels[foreground] = inst.gt_classes[matched[foreground]]
            assigned[foreground] = inst.gt_boxes.tensor[matched[foreground]]
            gt_labels.append(labels)
            gt_boxes.append(assigned)
            gt_ious.append(ious)
        return gt_labels, gt_boxes, gt_ious

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_objectness, gt_ious):
        """The YOLOX losses (class docstring). Arguments as RetinaNet's
        :meth:`~detectron2.modeling.RetinaNet.losses`, plus per level (N, R_i, 1) objectness
        logits and per image the (R,) IoUs of the predictions with their assigned boxes."""
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        num_pos = pos_mask.sum().item()
        get_event_storage().put_scalar("num_pos_anchors", num_pos / num_images)
        # the batch's count (momentum 0) through DenseDetector's EMA hook, which hqod.engine
        # averages over processes: YOLOX's max(mean over processes of the positives, 1)
        normalizer = max(self._ema_update("loss_normalizer", num_pos, 1, momentum=0.0), 1.0)
        self.loss_normalizer = normalizer

        logits = cat(pred_logits, dim=1)[pos_mask]
        cls_target = F.one_hot(gt_labels[pos_mask], self.num_classes).to(logits.dtype) * torch.stack(gt_ious)[pos_mask, None]
        loss_cls = F.binary_cross_entropy_with_logits(logits, cls_target, reduction="sum")
        objectness = cat(pred_objectness, dim=1).squeeze(-1)
        loss_obj = F.binary_cross_entropy_with_logits(objectness, pos_mask.to(objectness.dtype), reduction="sum")

        anchors = Boxes.cat(anchors).tensor.unsqueeze(0).expand(num_images, -1, -1)[pos_mask]
        deltas = cat(pred_anchor_deltas, dim=1)[pos_mask]
        targets = torch.stack(gt_boxes)[pos_mask].to(deltas.dtype)
        iou = aligned_box_iou(self.box2box_transform.apply_deltas(deltas, anchors), targets).clamp(min=1e-16)
        loss_box = self.box_loss_weight * (1 - iou.pow(2)).sum()
        losses = {"loss_cls": loss_cls / normalizer, "loss_box_reg": loss_box / normalizer, "loss_obj": loss_obj / normalizer}
        if self.l1_loss_weight > 0:
            strides = anchors[:, 2:] - anchors[:, :2]
            target_deltas = torch.cat([
                ((targets[:, :2] + targets[:, 2:]) / 2 - (anchors[:, :2] + anchors[:, 2:]) / 2) / strides,
                torch.log((targets[:, 2:] - targets[:, :2]) / strides + 1e-8),
            ], dim=1)
            losses["loss_l1"] = self.l1_loss_weight * F.l1_loss(deltas, target_deltas, reduction="sum") / normalizer
        return losses

    def forward_inference(self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]):
        pred_logits, pred_deltas, pred_obj = self._transpose_dense_predictions(predictions, [self.num_classes, 4, 1])
        anchors = self.anchor_generator(features)
        results = []
        for img_idx, image_size in enumerate(images.image_sizes):
            # the best class of each prior (YOLOX scores one class per box)
            scores = [(x[img_idx].sigmoid() * o[img_idx].sigmoid()) for x, o in zip(pred_logits, pred_obj)]
            best = [s.max(dim=1, keepdim=True) for s in scores]
            one_class = [torch.zeros_like(s).scatter_(1, i, v) for s, (v, i) in zip(scores, best)]
            deltas = [x[img_idx] for x in pred_deltas]
            results.append(self.inference_single_image(anchors, one_class, deltas, image_size))
        return results

    # decoding of the kept scores, per-class NMS, the best max_detections_per_image: RetinaNet's
    inference_single_image = RetinaNet.inference_single_image


class HQODYOLOX(HQODLossMixin, YOLOX):
    """
    :class:`YOLOX` with ``loss_tcorr`` and ``loss_hiou`` (:class:`HQODLossMixin`): the positives
    are SimOTA's foreground, p the sigmoid of the ground-truth class's logit (objectness not
    multiplied in), u the IoU of the decoded prediction with its assigned box; divided by
    YOLOX's normalizer and not scaled by the box loss weight, as the HQOD authors add them.
    """
