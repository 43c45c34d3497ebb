"""
ATSS (Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free Detection via Adaptive
Training Sample Selection", CVPR 2020), which detectron2 does not ship, and ATSS with the HQOD
losses.

As in the authors' code and MMDetection's ``atss_r50_fpn_1x_coco``: one square anchor per
location of size 8 * stride, adaptive training sample selection (:func:`atss_match`), focal loss
for classification, GIoU loss on the decoded boxes weighted by the centerness targets and
normalized by their sum (weight 2), and a centerness branch trained with binary cross-entropy;
at test time the classification score is multiplied by the predicted centerness before NMS.
Differences: the head is detectron2's RetinaNet head (BN per FPN level by default instead of GN)
and has no learnable per-level scale on the box deltas (as detectron2's FCOS).
"""
from typing import List, Tuple

import torch
import torch.distributed as dist
from fvcore.nn import giou_loss, sigmoid_focal_loss_jit
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms, cat
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.backbone import Backbone, build_backbone
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.meta_arch.build import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.fcos import FCOSHead
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..dense_head import dense_head
from .hqod_mixin import HQODLossMixin

__all__ = ["atss_match", "ATSSHead", "ATSS", "HQODATSS"]


@torch.no_grad()
def atss_match(
    anchors: List[Boxes], gt_boxes: Boxes, topk: int = 9, min_inside_dist: float = 0.01
) -> Tensor:
    """
    Adaptive Training Sample Selection (ATSS paper, Algorithm 1) for one image.

    1. On each pyramid level, the ``topk`` anchors whose centers are closest (L2) to the center
       of a ground-truth box are its candidates (all anchors of a level with fewer).
    2. The IoU threshold of the ground truth is the mean plus the (unbiased, as ``torch.std``
       and the official code) standard deviation of its candidates' IoUs.
    3. Candidates with IoU >= threshold whose center lies inside the ground-truth box (more than
       ``min_inside_dist`` from every side, as the official code) are its positives.
    4. An anchor positive for several ground truths goes to the one with the highest IoU.

    Args:
        anchors (list[Boxes]): #level anchors of the image, R in total.
        gt_boxes (Boxes): M ground-truth boxes.
        topk (int): candidates per level and ground truth.
        min_inside_dist (float): see 3.

    Returns:
        Tensor: (R,) int64 index of the matched ground truth of each anchor, -1 for background.
    """
    num_anchors_per_level = [len(x) for x in anchors]
    anchors = Boxes.cat(anchors)
    matched_idxs = torch.full((len(anchors),), -1, dtype=torch.long, device=anchors.device)
    num_gt = len(gt_boxes)
    if num_gt == 0 or len(anchors) == 0:
        return matched_idxs

    ious = pairwise_iou(gt_boxes, anchors)  # (M, R)
    anchor_centers = anchors.get_centers()  # (R, 2)
    gt_centers = gt_boxes.get_centers()  # (M, 2)
    distances = (gt_centers[:, None, :] - anchor_centers[None, :, :]).pow(2).sum(-1).sqrt()

    # 1. top-k closest anchors per level
    candidates, start = [], 0
    for num in num_anchors_per_level:
        if num > 0:
            _, idxs = distances[:, start : start + num].topk(min(topk, num), dim=1, largest=False)
            candidates.append(idxs + start)
        start += num
    candidates = torch.cat(candidates, dim=1)  # (M, C)
    candidate_ious = ious.gather(1, candidates)  # (M, C)

    # 2. adaptive IoU threshold: mean + std of the candidates' IoUs
    threshold = candidate_ious.mean(dim=1)
    if candidates.shape[1] > 1:
        threshold = threshold + candidate_ious.std(dim=1)
    is_pos = candidate_ious >= threshold[:, None]

    # 3. the anchor center must be inside the ground-truth box
    centers = anchor_centers[candidates]  # (M, C, 2)
    box = gt_boxes.tensor[:, None, :]  # (M, 1, 4)
    inside = torch.stack(
        [
            centers[..., 0] - box[..., 0],
            centers[..., 1] - box[..., 1],
            box[..., 2] - centers[..., 0],
            box[..., 3] - centers[..., 1],
        ],
        dim=-1,
    ).min(dim=-1).values > min_inside_dist
    is_pos &= inside

    # 4. one ground truth per anchor: the one with the highest IoU
    quality = torch.full_like(ious, float("-inf"))
    rows = torch.arange(num_gt, device=ious.device)[:, None].expand_as(candidates)
    quality[rows[is_pos], candidates[is_pos]] = candidate_ious[is_pos]
    best_quality, best_gt = quality.max(dim=0)
    positive = best_quality > float("-inf")
    matched_idxs[positive] = best_gt[positive]
    return matched_idxs


@dense_head(predictors={"cls_score": "cls_subnet", "bbox_pred": "bbox_subnet", "ctrness": "bbox_subnet"})
class ATSSHead(FCOSHead):
    """
    The ATSS head: detectron2's :class:`FCOSHead` (the :class:`RetinaNetHead` towers and
    predictors, plus a centerness predictor ``ctrness`` on the box tower, one anchor per
    location), also built from a yacs config (``MODEL.RETINANET.*``, as RetinaNetHead).
    """

    @configurable
    def __init__(self, *, input_shape: List[ShapeSpec], conv_dims: List[int], num_anchors: int = 1, **kwargs):
        """
        Args:
            num_anchors (int): must be 1 (ATSS predicts one anchor per location).
            Other arguments: see :class:`RetinaNetHead`.
        """
        if num_anchors != 1:
            raise ValueError(f"ATSS predicts one anchor per location; got num_anchors={num_anchors}.")
        super().__init__(input_shape=input_shape, conv_dims=conv_dims, **kwargs)


def _reduce_mean(value: float, device) -> float:
    """Mean of a number over the processes (MMDetection's ``reduce_mean`` of the normalizers)."""
    world_size = comm.get_world_size()
    if world_size == 1:
        return value
    tensor = torch.tensor(float(value), device=device)
    dist.all_reduce(tensor)
    return tensor.item() / world_size


@META_ARCH_REGISTRY.register()
class ATSS(DenseDetector):
    """
    ATSS, a RetinaNet-like dense detector with adaptive training sample selection; see the module
    docstring. Losses: ``loss_cls`` (focal, divided by the number of positives),
    ``loss_box_reg`` (GIoU weighted by the centerness targets, divided by their sum, times
    ``box_reg_loss_weight``) and ``loss_centerness`` (BCE, divided by the number of positives).
    Both normalizers are averaged over processes and at least 1, as in MMDetection. After each
    ``losses`` call, ``self.loss_normalizer`` and ``self.box_loss_normalizer`` hold them.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: nn.Module,
        head_in_features: List[str],
        anchor_generator: nn.Module,
        box2box_transform: Box2BoxTransform,
        num_classes: int,
        topk: int = 9,
        focal_loss_alpha: float = 0.25,
        focal_loss_gamma: float = 2.0,
        box_reg_loss_weight: float = 2.0,
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.6,
        max_detections_per_image: int = 100,
        pixel_mean,
        pixel_std,
        input_format: str = "BGR",
    ):
        """
        Args:
            backbone, head, head_in_features, num_classes, focal_loss_alpha, focal_loss_gamma,
            test_score_thresh, test_topk_candidates, test_nms_thresh, max_detections_per_image,
            pixel_mean, pixel_std, input_format: as in :class:`RetinaNet`; ``head`` returns
                logits, box deltas and centerness logits (:class:`ATSSHead`).
            anchor_generator: one square anchor of size 8 * stride per location in ATSS.
            box2box_transform (Box2BoxTransform): box coding; ATSS uses weights (10, 10, 5, 5).
            topk (int): candidates per pyramid level in :func:`atss_match`.
            box_reg_loss_weight (float): weight of the GIoU loss.
            test_score_thresh: threshold on the classification score, before it is multiplied
                by the centerness.
        """
        super().__init__(
            backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        self.num_classes = num_classes
        self.anchor_generator = anchor_generator
        self.box2box_transform = box2box_transform
        self.topk = topk
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma
        self.box_reg_loss_weight = box_reg_loss_weight
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg):
        """
        yacs config: shares ``MODEL.RETINANET.*`` and ``MODEL.ANCHOR_GENERATOR`` with RetinaNet
        (set one anchor size 8 * stride and aspect ratio 1 per level, BBOX_REG_WEIGHTS
        (10, 10, 5, 5)); optional ``MODEL.ATSS.{TOPK, BBOX_REG_LOSS_WEIGHT}``.
        """
        backbone = build_backbone(cfg)
        backbone_shape = backbone.output_shape()
        feature_shapes = [backbone_shape[f] for f in cfg.MODEL.RETINANET.IN_FEATURES]
        atss = cfg.MODEL.get("ATSS", {})
        return {
            "backbone": backbone,
            "head": ATSSHead(cfg, feature_shapes),
            "head_in_features": cfg.MODEL.RETINANET.IN_FEATURES,
            "anchor_generator": build_anchor_generator(cfg, feature_shapes),
            "box2box_transform": Box2BoxTransform(weights=cfg.MODEL.RETINANET.BBOX_REG_WEIGHTS),
            "num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
            "topk": atss.get("TOPK", 9),
            "focal_loss_alpha": cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA,
            "box_reg_loss_weight": atss.get("BBOX_REG_LOSS_WEIGHT", 2.0),
            "test_score_thresh": cfg.MODEL.RETINANET.SCORE_THRESH_TEST,
            "test_topk_candidates": cfg.MODEL.RETINANET.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": cfg.MODEL.RETINANET.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
        }

    def forward_training(self, images, features, predictions, gt_instances):
        pred_logits, pred_anchor_deltas, pred_centerness = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4, 1]
        )
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        return self.losses(
            anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness
        )

    @torch.no_grad()
    def label_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]):
        """
        Label the anchors of each image with :func:`atss_match`.

        Returns:
            list[Tensor]: #image (R,) labels: the matched class, or ``num_classes`` for
            background (ATSS ignores no anchor).
            list[Tensor]: #image (R, 4) matched ground-truth boxes (zeros for background).
        """
        num_anchors = sum(len(x) for x in anchors)
        gt_labels, matched_gt_boxes = [], []
        for inst in gt_instances:
            matched_idxs = atss_match(anchors, inst.gt_boxes, self.topk)
            if len(inst) > 0:
                labels = inst.gt_classes[matched_idxs.clip(min=0)].clone()
                labels[matched_idxs < 0] = self.num_classes
                boxes = inst.gt_boxes.tensor[matched_idxs.clip(min=0)].clone()
                boxes[matched_idxs < 0] = 0
            else:
                labels = torch.full(
                    (num_anchors,), self.num_classes, dtype=torch.long, device=self.device
                )
                boxes = torch.zeros((num_anchors, 4), device=self.device)
            gt_labels.append(labels)
            matched_gt_boxes.append(boxes)
        return gt_labels, matched_gt_boxes

    @staticmethod
    def compute_ctrness_targets(anchors: Tensor, gt_boxes: Tensor) -> Tensor:
        """
        Centerness targets (FCOS Eq. 3) of anchor centers inside their ground-truth boxes.

        Args:
            anchors, gt_boxes (Tensor): (P, 4) positive anchors and their matched boxes.

        Returns:
            Tensor: (P,) sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)).
        """
        cx = (anchors[:, 0] + anchors[:, 2]) / 2
        cy = (anchors[:, 1] + anchors[:, 3]) / 2
        left_right = torch.stack([cx - gt_boxes[:, 0], gt_boxes[:, 2] - cx], dim=1)
        top_bottom = torch.stack([cy - gt_boxes[:, 1], gt_boxes[:, 3] - cy], dim=1)
        ctrness = (left_right.min(dim=1).values / left_right.max(dim=1).values) * (
            top_bottom.min(dim=1).values / top_bottom.max(dim=1).values
        )
        return torch.sqrt(ctrness)

    def positive_anchors(self, anchors: List[Boxes], pos_mask: Tensor) -> Tensor:
        """(P, 4) anchors of the positives selected by the (N, R) ``pos_mask``."""
        anchors = Boxes.cat(anchors).tensor
        return anchors.unsqueeze(0).expand(len(pos_mask), -1, -1)[pos_mask]

    def losses(
        self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness
    ):
        """
        Args:
            anchors (list[Boxes]): #level anchors, R in total.
            pred_logits, pred_anchor_deltas, pred_centerness (list[Tensor]): #level predictions
                of shape (N, Hi * Wi * A, K or 4 or 1).
            gt_labels, gt_boxes (list[Tensor]): output of :meth:`label_anchors`.

        Returns:
            dict[str, Tensor]: ``loss_cls``, ``loss_box_reg``, ``loss_centerness``.
        """
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        gt_boxes = torch.stack(gt_boxes)  # (N, R, 4)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        num_pos = pos_mask.sum().item()
        get_event_storage().put_scalar("num_pos_anchors", num_pos / num_images)
        self.loss_normalizer = max(_reduce_mean(num_pos, self.device), 1.0)

        gt_labels_target = F.one_hot(gt_labels, num_classes=self.num_classes + 1)[:, :, :-1]
        loss_cls = sigmoid_focal_loss_jit(
            cat(pred_logits, dim=1),
            gt_labels_target.to(pred_logits[0].dtype),
            alpha=self.focal_loss_alpha,
            gamma=self.focal_loss_gamma,
            reduction="sum",
        )

        pos_anchors = self.positive_anchors(anchors, pos_mask)
        pos_gt_boxes = gt_boxes[pos_mask]
        pred_boxes = self.box2box_transform.apply_deltas(
            cat(pred_anchor_deltas, dim=1)[pos_mask], pos_anchors
        )
        ctrness_targets = self.compute_ctrness_targets(pos_anchors, pos_gt_boxes)  # (P,)
        self.box_loss_normalizer = max(_reduce_mean(ctrness_targets.sum().item(), self.device), 1.0)
        loss_box_reg = (
            giou_loss(pred_boxes, pos_gt_boxes.to(pred_boxes.dtype), reduction="none")
            * ctrness_targets
        ).sum()

        pred_centerness = cat(pred_centerness, dim=1).squeeze(dim=2)[pos_mask]
        loss_centerness = F.binary_cross_entropy_with_logits(
            pred_centerness, ctrness_targets.to(pred_centerness.dtype), reduction="sum"
        )
        return {
            "loss_cls": loss_cls / self.loss_normalizer,
            "loss_box_reg": loss_box_reg * self.box_reg_loss_weight / self.box_loss_normalizer,
            "loss_centerness": loss_centerness / self.loss_normalizer,
        }

    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]
    ):
        pred_logits, pred_anchor_deltas, pred_centerness = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4, 1]
        )
        anchors = self.anchor_generator(features)
        results: List[Instances] = []
        for img_idx, image_size in enumerate(images.image_sizes):
            results.append(
                self.inference_single_image(
                    anchors,
                    [x[img_idx].sigmoid() for x in pred_logits],
                    [x[img_idx].sigmoid() for x in pred_centerness],
                    [x[img_idx] for x in pred_anchor_deltas],
                    image_size,
                )
            )
        return results

    def inference_single_image(
        self,
        anchors: List[Boxes],
        box_cls: List[Tensor],
        box_ctr: List[Tensor],
        box_delta: List[Tensor],
        image_size: Tuple[int, int],
    ) -> Instances:
        """
        Per level, keep the ``test_topk_candidates`` best (anchor, class) pairs whose
        classification score exceeds ``test_score_thresh``; score them by classification score
        times centerness; decode; class-wise NMS over all levels.

        Args:
            box_cls, box_ctr, box_delta (list[Tensor]): #level (Hi * Wi * A, K or 1 or 4) class
                probabilities, centerness probabilities and box deltas of one image.
        """
        boxes_all, scores_all, classes_all = [], [], []
        for anchors_i, cls_i, ctr_i, delta_i in zip(anchors, box_cls, box_ctr, box_delta):
            keep = cls_i > self.test_score_thresh
            scores = cls_i[keep]
            topk_idxs = torch.nonzero(keep)  # (K, 2): anchor, class
            num_topk = min(self.test_topk_candidates, topk_idxs.size(0))
            scores, order = scores.sort(descending=True)
            scores = scores[:num_topk]
            anchor_idxs, class_idxs = topk_idxs[order[:num_topk]].unbind(dim=1)
            boxes_all.append(
                self.box2box_transform.apply_deltas(
                    delta_i[anchor_idxs], anchors_i.tensor[anchor_idxs]
                )
            )
            scores_all.append(scores * ctr_i[anchor_idxs, 0])
            classes_all.append(class_idxs)
        boxes, scores, classes = cat(boxes_all), cat(scores_all), cat(classes_all)
        keep = batched_nms(boxes, scores, classes, self.test_nms_thresh)
        keep = keep[: self.max_detections_per_image]
        return Instances(
            image_size,
            pred_boxes=Boxes(boxes[keep]),
            scores=scores[keep],
            pred_classes=classes[keep],
        )


@META_ARCH_REGISTRY.register()
class HQODATSS(HQODLossMixin, ATSS):
    """
    :class:`ATSS` with ``loss_tcorr`` and ``loss_hiou`` (:class:`HQODLossMixin`): p and u for each
    positive anchor, divided by ATSS's box-loss normalizer, the centerness-target sum; unlike the
    GIoU loss they are NOT weighted by the centerness targets (as the official HQOD code).
    """

    def harmony_normalizer(self) -> float:
        return self.box_loss_normalizer
