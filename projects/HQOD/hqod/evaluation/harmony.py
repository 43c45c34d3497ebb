"""
Task-harmony statistics of a detector's final detections (HQOD, Sec. I and IV-D; Figs. 2, 4, 5).

After NMS each detection is matched to the ground truth of its class, COCO style: detections in
decreasing score order, each taking the unmatched ground-truth box it overlaps most, a true
positive (TP) when that IoU is at least ``iou_threshold`` (crowd boxes are never matched). For
every TP the evaluator records the classification score p and the IoU u with its ground truth,
and reports:

* ``mean_gap``: mean |p - u| over TPs (in [0, 1]; 0 is perfect harmony);
* ``gap_a-b``: % of TPs with |p - u| in [a, b) (Fig. 5; the last bin includes 1.0);
* ``ideal``: % of TPs with p and u both >= 0.7 (Fig. 2's ideal region);
* ``tp_iou_a-b``: % of TPs with IoU in [a, b) (Fig. 4; the last bin includes 1.0);
* ``corr``: Pearson correlation of p and u over TPs (1: the scores rank the TPs exactly as
  their IoUs do; unlike ``mean_gap`` it does not depend on how high the scores are overall);
* ``num_tp``: the number of TPs.
"""
import json
import logging
import os

import numpy as np
import torch

from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Boxes, BoxMode, pairwise_iou
from detectron2.utils import comm

logger = logging.getLogger(__name__)

GAP_BINS = np.round(np.arange(0.0, 1.01, 0.1), 2)  # Fig. 5: [0, 0.1), ..., [0.9, 1.0]
IOU_BINS = np.round(np.arange(0.5, 1.01, 0.1), 2)  # Fig. 4: [0.5, 0.6), ..., [0.9, 1.0]
IDEAL_THRESHOLD = 0.7  # Fig. 2: score and IoU both at least this


def match_detections(pred_boxes, pred_scores, pred_classes, gt_boxes, gt_classes, gt_crowd=None, *, iou_threshold=0.5):
    """
    Greedy COCO-style matching of one image's detections to its ground truth.

    Args:
        pred_boxes (Tensor[N, 4]), gt_boxes (Tensor[M, 4]): XYXY absolute boxes.
        pred_scores (Tensor[N]), pred_classes (Tensor[N]), gt_classes (Tensor[M]).
        gt_crowd (Tensor[M] of bool or None): crowd boxes, never matched.

    Returns:
        (scores, ious): float64 numpy arrays, one entry per true positive.
    """
    if len(pred_boxes) == 0 or len(gt_boxes) == 0:
        return np.zeros(0), np.zeros(0)
    ious = pairwise_iou(Boxes(pred_boxes.float()), Boxes(gt_boxes.float())).double()
    ious[pred_classes[:, None] != gt_classes[None, :]] = -1.0
    if gt_crowd is not None:
        ious[:, gt_crowd.bool()] = -1.0
    taken = torch.zeros(len(gt_boxes), dtype=torch.bool)
    scores, matched = [], []
    # stable sort: equal scores keep the detector's order, as pycocotools does
    for i in torch.argsort(pred_scores, descending=True, stable=True).tolist():
        row = ious[i].masked_fill(taken, -1.0)
        best = int(row.argmax())
        if row[best] >= iou_threshold:
            taken[best] = True
            scores.append(float(pred_scores[i]))
            matched.append(float(row[best]))
    return np.asarray(scores, dtype=np.float64), np.asarray(matched, dtype=np.float64)


def bin_shares(values, edges):
    """% of ``values`` in each [edges[i], edges[i+1]) bin, the last one closed on the right."""
    if len(values) == 0:
        return np.zeros(len(edges) - 1)
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    return 100.0 * counts / len(values)


def _bin_name(prefix, lo, hi):
    return f"{prefix}{lo:.1f}-{hi:.1f}"


def harmony_metrics(scores, ious):
    """The metrics of the module docstring from the TPs' scores and IoUs (numpy arrays)."""
    scores, ious = np.asarray(scores, dtype=np.float64), np.asarray(ious, dtype=np.float64)
    gap = np.abs(scores - ious)
    res = {"num_tp": float(len(scores))}
    res["mean_gap"] = float(gap.mean()) if len(gap) else float("nan")
    ideal = (scores >= IDEAL_THRESHOLD) & (ious >= IDEAL_THRESHOLD)
    res["ideal"] = float(100.0 * ideal.mean()) if len(gap) else float("nan")
    spread = len(gap) > 1 and scores.std() > 0 and ious.std() > 0
    res["corr"] = float(np.corrcoef(scores, ious)[0, 1]) if spread else float("nan")
    for lo, hi, share in zip(GAP_BINS[:-1], GAP_BINS[1:], bin_shares(gap, GAP_BINS)):
        res[_bin_name("gap_", lo, hi)] = float(share)
    iou_in_range = ious[ious >= IOU_BINS[0]]
    for lo, hi, share in zip(IOU_BINS[:-1], IOU_BINS[1:], bin_shares(iou_in_range, IOU_BINS)):
        res[_bin_name("tp_iou_", lo, hi)] = float(share)
    return res


class HarmonyEvaluator(DatasetEvaluator):
    """
    A detectron2 DatasetEvaluator, run beside COCOEvaluator (``DatasetEvaluators``), that returns
    ``{"harmony": harmony_metrics(...)}`` and, with ``output_dir``, writes every TP's
    ``(image_id, score, iou)`` to ``harmony_tp.json`` there for plotting
    (:mod:`hqod.evaluation.harmony_plots`). During training detectron2's EvalHook puts the
    metrics into the event storage (metrics.json, TensorBoard) as ``harmony/<name>``.
    """

    def __init__(self, dataset_name, output_dir=None, *, iou_threshold=0.5, distributed=True):
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._iou_threshold = iou_threshold
        self._distributed = distributed
        self._gt = None

    def _ground_truth(self):
        """image_id -> (XYXY boxes, contiguous class ids, crowd flags), from the dataset dicts."""
        if self._gt is None:
            self._gt = {}
            for record in DatasetCatalog.get(self._dataset_name):
                anns = record.get("annotations", [])
                boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
                self._gt[record["image_id"]] = (
                    torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
                    torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
                )
        return self._gt

    def reset(self):
        self._records = []  # (image_id, score, iou) per TP

    def process(self, inputs, outputs):
        gt = self._ground_truth()
        for inp, out in zip(inputs, outputs):
            if "instances" not in out:
                continue
            inst = out["instances"].to("cpu")
            gt_boxes, gt_classes, gt_crowd = gt[inp["image_id"]]
            scores, ious = match_detections(
                inst.pred_boxes.tensor, inst.scores, inst.pred_classes,
                gt_boxes, gt_classes, gt_crowd, iou_threshold=self._iou_threshold,
            )
            self._records.extend((inp["image_id"], s, u) for s, u in zip(scores.tolist(), ious.tolist()))

    def evaluate(self):
        records = self._records
        if self._distributed:
            comm.synchronize()
            records = [r for part in comm.gather(records, dst=0) for r in part]
            if not comm.is_main_process():
                return {}
        if not records:
            logger.warning(f"HarmonyEvaluator: no true positives on {self._dataset_name}.")
        scores = np.array([r[1] for r in records], dtype=np.float64)
        ious = np.array([r[2] for r in records], dtype=np.float64)
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            with open(os.path.join(self._output_dir, "harmony_tp.json"), "w") as f:
                json.dump({"dataset": self._dataset_name, "image_id": [r[0] for r in records], "score": scores.tolist(), "iou": ious.tolist()}, f)
        return {"harmony": harmony_metrics(scores, ious)}
