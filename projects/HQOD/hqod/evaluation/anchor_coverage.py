"""
How well a detector's anchors (SSD's priors) cover the ground-truth boxes of a dataset: for each
box, the IoU of its best anchor and the number of anchors its matcher makes positive. A box whose
best anchor is under the positive threshold is trained only through the one match the matcher
forces (``allow_low_quality_matches``); when that is most boxes, the detector learns little
(SSD-lite's COCO priors on the digits, BENCHMARKS.md "Lightweight detectors").
"""
import math
from typing import Dict, Iterable, List, Sequence

import torch
from torch import Tensor

from detectron2.structures import Boxes, pairwise_iou

__all__ = ["anchor_coverage", "box_coverage", "coverage_table", "model_anchors", "positive_threshold"]


def box_coverage(anchors: Boxes, gt_boxes: Boxes, iou_threshold: float) -> Dict[str, Tensor]:
    """Per ground-truth box: ``size`` (square root of its area), ``best_iou`` (of its best anchor)
    and ``num_positive`` (anchors with IoU >= ``iou_threshold``)."""
    iou = pairwise_iou(gt_boxes, anchors)
    return {
        "size": gt_boxes.area().sqrt(),
        "best_iou": iou.max(dim=1).values,
        "num_positive": (iou >= iou_threshold).sum(dim=1),
    }


@torch.no_grad()
def model_anchors(model, batched_inputs: List[dict]) -> Boxes:
    """The anchors ``model`` (a detectron2 dense detector with an ``anchor_generator``) places
    on the feature maps of the padded batch ``batched_inputs``, all levels concatenated."""
    images = model.preprocess_image(batched_inputs)
    features = model.backbone(images.tensor)
    return Boxes.cat(model.anchor_generator([features[f] for f in model.head_in_features]))


def positive_threshold(model) -> float:
    """The IoU at and above which ``model.anchor_matcher`` labels an anchor positive."""
    matcher = model.anchor_matcher
    return float(matcher.thresholds[-2])  # [-inf, ..., positive threshold, inf]


def anchor_coverage(model, batches: Iterable[List[dict]]) -> Dict[str, Tensor]:
    """:func:`box_coverage` of every ground-truth box of ``batches`` (lists of detectron2 dataset
    dicts with ``instances``, e.g. from the training loader), concatenated."""
    threshold = positive_threshold(model)
    parts = []
    for batch in batches:
        anchors = model_anchors(model, batch)
        parts += [box_coverage(anchors, inputs["instances"].gt_boxes.to(anchors.device), threshold) for inputs in batch]
    return {key: torch.cat([p[key] for p in parts]) for key in ("size", "best_iou", "num_positive")}


def coverage_table(coverage: Dict[str, Tensor], iou_threshold: float, size_edges: Sequence[float] = (0, 24, 40, 80, math.inf)) -> str:
    """A markdown table of :func:`anchor_coverage` by box size (pixels, square root of the area):
    boxes, mean best IoU, share of boxes whose best anchor is under ``iou_threshold``, mean
    positives per box; the last row over all boxes."""
    rows = [
        f"| box size (px) | boxes | mean best IoU | best IoU < {iou_threshold:g} | positives per box |",
        "|---|---:|---:|---:|---:|",
    ]
    buckets = [(f"{lo:g}-{hi:g}", (coverage["size"] >= lo) & (coverage["size"] < hi)) for lo, hi in zip(size_edges, size_edges[1:])]
    for name, mask in buckets + [("all", torch.ones_like(coverage["size"], dtype=torch.bool))]:
        n = int(mask.sum())
        if n == 0:
            rows.append(f"| {name} | 0 | | | |")
            continue
        best, positives = coverage["best_iou"][mask], coverage["num_positive"][mask].float()
        rows.append(
            f"| {name} | {n} | {best.mean():.3f} | {(best < iou_threshold).float().mean() * 100:.0f} % | {positives.mean():.2f} |"
        )
    return "\n".join(rows)
