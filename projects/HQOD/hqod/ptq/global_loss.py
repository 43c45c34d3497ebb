"""
Reg-PTQ's global loss between the FP32 head outputs (the teacher) and the quantized ones; no
ground truth. Choices where the paper is silent (../shared/notes/regptq.md):

    L_G = mean_anchors sum_classes BCE(sigmoid(y), y_hat)
          + lam * mean_kept sum_coords (|b_hat - b| / (w, h, w, h))^p

* classification: sigmoid classifiers (RetinaNet, FCOS, ATSS), so the cross-entropy is the
  binary one with the FP32 probabilities as soft targets, summed over classes, averaged over all
  anchors of all images (the classification term is not filtered); every head output other than
  the boxes (FCOS/ATSS centerness too) is treated so;
* boxes: decoded by the detector's own box transform from its anchors; the L_p distance is
  divided by the FP32 box's width and height so that one ``lam`` serves every image and object
  size (defaults ``p = 1``, ``lam = 1``);
* the two-step filter (``box_filter``): FP32 confidence (the largest class probability)
  ``>= theta_c`` (2e-4), then IoU(FP32 box, quantized box) ``>= theta_i`` (0.1); the box term
  averages over the kept anchors (0 when none is kept).

Head outputs are detectron2's: one list per output (class logits first, box deltas second), one
``(N, A * K, H, W)`` tensor per level; anchors one ``(H * W * A, 4)`` tensor per level.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes
from detectron2.structures.boxes import matched_pairwise_iou

__all__ = ["global_loss", "flatten_level", "box_filter_mask"]

BOX_OUTPUT = 1  # detectron2's dense heads: (class logits, box deltas, ...)


def flatten_level(outputs: Sequence[Tensor], anchors: Sequence[Tensor]) -> Tensor:
    """Per-level ``(N, A * K, H, W)`` outputs -> ``(N, sum_l H*W*A, K)``, in anchor order."""
    flat = []
    for x, a in zip(outputs, anchors):
        per_location = a.shape[0] // (x.shape[2] * x.shape[3])
        flat.append(permute_to_N_HWA_K(x, x.shape[1] // per_location))
    return torch.cat(flat, dim=1)


def box_filter_mask(fp_scores: Tensor, fp_boxes: Tensor, q_boxes: Tensor, theta_c: float, theta_i: float) -> Tensor:
    """Reg-PTQ's two-step filter on ``R`` predictions: FP32 confidence ``>= theta_c``, then
    IoU(FP32 box, quantized box) ``>= theta_i``."""
    keep = fp_scores >= theta_c
    iou = matched_pairwise_iou(Boxes(fp_boxes.detach()), Boxes(q_boxes.detach()))
    return keep & (iou >= theta_i)


def global_loss(fp_preds, q_preds, anchors: List[Tensor], box2box, cfg, only: Optional[int] = None) -> Tensor:
    """``L_G`` (module docstring) of one batch; ``only``: the term of that head output alone
    (the classification term of a class output, or the box term)."""
    terms = []
    for i, (fp_out, q_out) in enumerate(zip(fp_preds, q_preds)):
        if i == BOX_OUTPUT or (only is not None and i != only):
            continue
        target = torch.sigmoid(flatten_level(fp_out, anchors).detach())
        logits = flatten_level(q_out, anchors)
        terms.append(F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1).mean())
    if only is None or only == BOX_OUTPUT:
        all_anchors = torch.cat(anchors)
        n = fp_preds[0][0].shape[0]
        fp_deltas = flatten_level(fp_preds[BOX_OUTPUT], anchors).detach().reshape(-1, 4)
        q_deltas = flatten_level(q_preds[BOX_OUTPUT], anchors).reshape(-1, 4)
        boxes = all_anchors.repeat(n, 1)
        fp_boxes = box2box.apply_deltas(fp_deltas, boxes)
        q_boxes = box2box.apply_deltas(q_deltas, boxes)
        keep = torch.ones(fp_boxes.shape[0], dtype=torch.bool, device=fp_boxes.device)
        if cfg.box_filter:
            scores = torch.sigmoid(flatten_level(fp_preds[0], anchors).detach()).amax(-1).reshape(-1)
            keep = box_filter_mask(scores, fp_boxes, q_boxes, cfg.theta_c, cfg.theta_i)
        wh = (fp_boxes[:, 2:] - fp_boxes[:, :2]).clamp_min(1e-6).repeat(1, 2)
        distance = ((q_boxes - fp_boxes).abs() / wh).pow(cfg.p).sum(-1)
        box = distance[keep].mean() if bool(keep.any()) else q_boxes.sum() * 0.0
        terms.append(cfg.lam * box)
    return sum(terms)
