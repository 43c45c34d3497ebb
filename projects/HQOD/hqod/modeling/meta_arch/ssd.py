"""
SSD (Liu et al., ECCV 2016) in its SSD-lite form (MobileNetV2 paper, Sec. 6.2), and SSD with the
HQOD losses: softmax classification over the classes and background with hard negative mining,
smooth-L1 box regression, SSD's prior boxes. Facts of the HQOD authors' SSD-lite:
../shared/notes/lightweight-detectors.md.
"""
import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from fvcore.nn import smooth_l1_loss
from torch import Tensor, nn

from detectron2.layers import Conv2d, ShapeSpec, cat
from detectron2.modeling.anchor_generator import ANCHOR_GENERATOR_REGISTRY, BufferList, DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage

from ..dense_head import dense_head
from ..mobilenet import conv_bn_relu6
from .hqod_mixin import HQODLossMixin

__all__ = ["SSD", "HQODSSD", "SSDAnchorGenerator", "SSDLiteHead", "hard_negative_mask"]


@ANCHOR_GENERATOR_REGISTRY.register()
class SSDAnchorGenerator(DefaultAnchorGenerator):
    """
    SSD's prior boxes: per level, a square of side ``min_size``, a square of side
    ``sqrt(min_size * max_size)``, and for each aspect ratio r the boxes
    ``(min_size * sqrt(r), min_size / sqrt(r))`` and their transpose (SSD Sec. 2.2): 2 + 2 x
    len(ratios) anchors per location, centred on the cells of the level's grid.
    """

    def __init__(self, *, min_sizes: Sequence[float], max_sizes: Sequence[float], aspect_ratios, strides, offset: float = 0.5):
        """
        Args:
            min_sizes, max_sizes: per level, in input pixels.
            aspect_ratios: ratios > 1 (list, or one list per level); each adds two anchors.
            strides, offset: as :class:`DefaultAnchorGenerator`'s (centres at
                ``(i + offset) * stride``).
        """
        if len(min_sizes) != len(max_sizes):
            raise ValueError(f"SSDAnchorGenerator: {len(min_sizes)} min_sizes but {len(max_sizes)} max_sizes.")
        sizes = [[lo, hi] for lo, hi in zip(min_sizes, max_sizes)]
        super().__init__(sizes=sizes, aspect_ratios=aspect_ratios, strides=strides, offset=offset)

    def _calculate_anchors(self, sizes, aspect_ratios):
        # called by DefaultAnchorGenerator.__init__ with the per-level (min, max) pairs
        return BufferList([self.generate_ssd_anchors(lo, hi, ratios) for (lo, hi), ratios in zip(sizes, aspect_ratios)])

    @staticmethod
    def generate_ssd_anchors(min_size: float, max_size: float, aspect_ratios: Sequence[float]) -> Tensor:
        """The (2 + 2 x len(aspect_ratios), 4) XYXY anchors of one cell, centred on 0."""
        wh = [(min_size, min_size), (math.sqrt(min_size * max_size),) * 2]
        for r in aspect_ratios:
            wh += [(min_size * math.sqrt(r), min_size / math.sqrt(r)), (min_size / math.sqrt(r), min_size * math.sqrt(r))]
        return torch.tensor([[-w / 2, -h / 2, w / 2, h / 2] for w, h in wh], dtype=torch.float32)


@dense_head(predictors={"cls_score": "cls_towers", "bbox_pred": "bbox_towers"}, shared=False)
class SSDLiteHead(nn.Module):
    """
    SSD-lite's head: for each level its own 3x3 depthwise conv (BN, ReLU6) then 1x1 predictor,
    for the class scores (classes + background) and for the box deltas. Nothing is shared over
    levels (each has its own width), so it is declared ``shared=False``.
    """

    def __init__(self, *, input_shape: List[ShapeSpec], num_classes: int, num_anchors: int, norm="BN"):
        super().__init__()
        channels = [s.channels for s in input_shape]
        self.cls_towers = nn.ModuleList(nn.Sequential(conv_bn_relu6(c, c, 3, groups=c, norm=norm)) for c in channels)
        self.bbox_towers = nn.ModuleList(nn.Sequential(conv_bn_relu6(c, c, 3, groups=c, norm=norm)) for c in channels)
        self.cls_score = nn.ModuleList(Conv2d(c, num_anchors * (num_classes + 1), 1) for c in channels)
        self.bbox_pred = nn.ModuleList(Conv2d(c, num_anchors * 4, 1) for c in channels)
        for predictors in (self.cls_score, self.bbox_pred):
            for conv in predictors:
                nn.init.xavier_uniform_(conv.weight)
                nn.init.zeros_(conv.bias)

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Per level (N, A x (K + 1), H, W) logits and (N, A x 4, H, W) deltas."""
        logits = [pred(tower(f)) for f, tower, pred in zip(features, self.cls_towers, self.cls_score)]
        deltas = [pred(tower(f)) for f, tower, pred in zip(features, self.bbox_towers, self.bbox_pred)]
        return logits, deltas


def hard_negative_mask(neg_losses: Tensor, negatives: Tensor, num_negatives: Tensor) -> Tensor:
    """
    SSD's hard negative mining (Sec. 2.2): per image, the ``num_negatives`` negatives of largest
    classification loss.

    Args:
        neg_losses: (N, R) per-anchor classification losses.
        negatives: (N, R) bool, the candidate negatives.
        num_negatives: (N,) how many to keep per image (capped at the candidates).

    Returns:
        (N, R) bool mask of the kept negatives.
    """
    losses = neg_losses.detach().masked_fill(~negatives, -math.inf)
    order = losses.argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)  # rank of each anchor's loss within its image
    keep = torch.minimum(num_negatives, negatives.sum(dim=1))
    return (rank < keep[:, None]) & negatives


class SSD(DenseDetector):
    """
    SSD with a softmax over ``num_classes + 1`` outputs (the last one background): anchors
    matched at IoU >= 0.5 (each ground truth also to its best anchor), cross-entropy on the
    positives and on the hardest ``neg_pos_ratio`` x as many negatives per image, smooth L1 on the
    positives' deltas (summed over the 4), both divided by the number of positives in the batch
    (over all processes). Built from keyword arguments (LazyConfig), like detectron2's FCOS.
    """

    def __init__(
        self,
        *,
        backbone,
        head: nn.Module,
        head_in_features=None,
        anchor_generator: nn.Module,
        box2box_transform: Box2BoxTransform,
        anchor_matcher: Matcher,
        num_classes: int,
        neg_pos_ratio: float = 3.0,
        smooth_l1_beta: float = 1.0,
        test_score_thresh: float = 0.02,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.45,
        max_detections_per_image: int = 200,
        pixel_mean,
        pixel_std,
        input_format: str = "RGB",
    ):
        """
        Args:
            backbone, head, head_in_features, pixel_mean, pixel_std: as :class:`DenseDetector`'s;
                the head returns per level the logits of ``num_classes + 1`` outputs per anchor
                and the 4 deltas (:class:`SSDLiteHead`).
            anchor_generator: SSD's priors (:class:`SSDAnchorGenerator`).
            box2box_transform: SSD's coder (weights 10, 10, 5, 5: the variances 0.1, 0.2).
            anchor_matcher: e.g. ``Matcher([0.5], [0, 1], allow_low_quality_matches=True)``.
            neg_pos_ratio: negatives kept per positive by hard negative mining.
            smooth_l1_beta: of the box loss.
            test_*: score threshold, candidates per level, NMS IoU, detections per image.
        """
        super().__init__(backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std)
        shapes = backbone.output_shape()
        level_strides = [shapes[f].stride for f in self.head_in_features]
        if list(anchor_generator.strides) != level_strides:
            raise ValueError(
                f"SSD: the prior strides {list(anchor_generator.strides)} are not those of the levels "
                f"{self.head_in_features} ({level_strides}); set anchor_generator.strides (and one prior "
                "size per level) to match the backbone."
            )
        self.num_classes = num_classes
        self.anchor_generator = anchor_generator
        self.box2box_transform = box2box_transform
        self.anchor_matcher = anchor_matcher
        self.neg_pos_ratio = neg_pos_ratio
        self.smooth_l1_beta = smooth_l1_beta
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.input_format = input_format

    def forward_training(self, images, features, predictions, gt_instances):
        pred_logits, pred_anchor_deltas = self._transpose_dense_predictions(predictions, [self.num_classes + 1, 4])
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        return self.losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)

    @torch.no_grad()
    def label_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]):
        """
        Returns:
            list[Tensor]: per image, (R,) labels: the class, ``num_classes`` for background,
            -1 ignored (when the matcher has an ignore band).
            list[Tensor]: per image, (R, 4) matched ground-truth boxes (zeros for background).
        """
        anchors = Boxes.cat(anchors)
        gt_labels, matched_gt_boxes = [], []
        for gt_per_image in gt_instances:
            if len(gt_per_image) == 0:
                gt_labels.append(torch.full((len(anchors),), self.num_classes, dtype=torch.long, device=anchors.device))
                matched_gt_boxes.append(torch.zeros_like(anchors.tensor))
                continue
            matched_idxs, anchor_labels = self.anchor_matcher(pairwise_iou(gt_per_image.gt_boxes, anchors))
            labels = gt_per_image.gt_classes[matched_idxs]
            labels[anchor_labels == 0] = self.num_classes
            labels[anchor_labels == -1] = -1
            gt_labels.append(labels)
            matched_gt_boxes.append(gt_per_image.gt_boxes.tensor[matched_idxs])
        return gt_labels, matched_gt_boxes

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """
        ``loss_cls`` (cross-entropy of the positives and the mined negatives) and
        ``loss_box_reg`` (smooth L1 of the positives), each summed and divided by the number of
        positives. Arguments as RetinaNet's :meth:`~detectron2.modeling.RetinaNet.losses`, with
        ``num_classes + 1`` logits per anchor.
        """
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        num_pos = pos_mask.sum().item()
        get_event_storage().put_scalar("num_pos_anchors", num_pos / num_images)
        # the batch's count (momentum 0: no average over iterations), through DenseDetector's
        # EMA hook, which hqod.engine sums over processes
        normalizer = self._ema_update("loss_normalizer", max(num_pos, 1), 1, momentum=0.0)

        logits = cat(pred_logits, dim=1)  # (N, R, K + 1)
        ce = F.cross_entropy(logits.flatten(0, 1), gt_labels.clamp(min=0).flatten(), reduction="none").view_as(gt_labels)
        negatives = gt_labels == self.num_classes
        num_negatives = (self.neg_pos_ratio * pos_mask.sum(dim=1)).long()
        kept = pos_mask | hard_negative_mask(ce, negatives, num_negatives)
        loss_cls = ce[kept].sum()

        anchors = Boxes.cat(anchors).tensor.unsqueeze(0).expand(num_images, -1, -1)
        target_deltas = self.box2box_transform.get_deltas(anchors[pos_mask], torch.stack(gt_boxes)[pos_mask])
        deltas = cat(pred_anchor_deltas, dim=1)[pos_mask]
        loss_box_reg = smooth_l1_loss(deltas, target_deltas.to(deltas.dtype), beta=self.smooth_l1_beta, reduction="sum")
        return {"loss_cls": loss_cls / normalizer, "loss_box_reg": loss_box_reg / normalizer}

    def forward_inference(self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]):
        pred_logits, pred_anchor_deltas = self._transpose_dense_predictions(predictions, [self.num_classes + 1, 4])
        anchors = self.anchor_generator(features)
        results = []
        for img_idx, image_size in enumerate(images.image_sizes):
            scores = [x[img_idx].softmax(dim=-1)[:, :-1] for x in pred_logits]  # background dropped
            deltas = [x[img_idx] for x in pred_anchor_deltas]
            results.append(self.inference_single_image(anchors, scores, deltas, image_size))
        return results

    # decoding of the kept scores, per-class NMS, the best max_detections_per_image: RetinaNet's
    inference_single_image = RetinaNet.inference_single_image


class HQODSSD(HQODLossMixin, SSD):
    """
    :class:`SSD` with ``loss_tcorr`` and ``loss_hiou`` (:class:`HQODLossMixin`): p is the softmax
    probability of the ground-truth class over the classes and background (the HQOD authors'
    SSD), u the IoU of the positive's decoded box with its matched box; divided by the number of
    positives, as SSD's own losses.
    """

    def positive_scores(self, logits: Tensor, gt_classes: Tensor) -> Tensor:
        return logits.softmax(dim=1).gather(1, gt_classes[:, None]).squeeze(1)
