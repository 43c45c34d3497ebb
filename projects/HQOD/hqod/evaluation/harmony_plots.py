"""
Figures of task harmony (HQOD Figs. 1, 2, 4, 5, 6) from the true positives a
:class:`~hqod.evaluation.HarmonyEvaluator` recorded: ``runs`` maps a run's name to its
``(scores, ious)`` arrays (``load_tp_records`` reads them from ``harmony_tp.json``).
"""
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from detectron2.utils.visualizer import Visualizer  # noqa: E402

from .harmony import GAP_BINS, IDEAL_THRESHOLD, IOU_BINS, bin_shares  # noqa: E402

GT_COLOR = (1.0, 0.0, 0.0)  # ground truth in red, as in HQOD Fig. 1
PRED_COLOR = (0.1, 0.6, 1.0)


def load_tp_records(path):
    """(scores, ious) from a HarmonyEvaluator's ``harmony_tp.json`` (file or its directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, "harmony_tp.json")
    with open(path) as f:
        data = json.load(f)
    return np.asarray(data["score"], dtype=np.float64), np.asarray(data["iou"], dtype=np.float64)


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_score_iou_density(runs, path):
    """Fig. 2: per run, the density of TPs over (IoU, classification score), with the ideal
    region (both >= 0.7) outlined and the line score = IoU."""
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.8), squeeze=False)
    for ax, (name, (scores, ious)) in zip(axes[0], runs.items()):
        ax.hist2d(ious, scores, bins=[np.linspace(0.5, 1, 26), np.linspace(0, 1, 41)], cmap="viridis", cmin=1)
        ax.plot([0.5, 1], [0.5, 1], "w--", lw=1)
        ax.add_patch(Rectangle((IDEAL_THRESHOLD, IDEAL_THRESHOLD), 1 - IDEAL_THRESHOLD, 1 - IDEAL_THRESHOLD, fill=False, ec="red", ls="--", lw=1.5))
        ax.set(xlim=(0.5, 1), ylim=(0, 1), xlabel="IoU with ground truth", ylabel="classification score", title=f"{name} ({len(scores)} TPs)")
    return _save(fig, path)


def plot_gap_histogram(runs, path):
    """Fig. 5: % of TPs per |score - IoU| bin, one bar per run."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(runs)
    centers = np.arange(len(GAP_BINS) - 1)
    for i, (name, (scores, ious)) in enumerate(runs.items()):
        ax.bar(centers + (i - (len(runs) - 1) / 2) * width, bin_shares(np.abs(scores - ious), GAP_BINS), width, label=name)
    ax.set_xticks(centers, [f"{a:.1f}-{b:.1f}" for a, b in zip(GAP_BINS[:-1], GAP_BINS[1:])])
    ax.set(xlabel="|classification score - IoU|", ylabel="% of true positives")
    ax.legend()
    return _save(fig, path)


def plot_iou_bin_difference(run, baseline, path, *, names=("run", "baseline")):
    """Fig. 4: per IoU bin, the % of TPs of ``run`` minus that of ``baseline`` (points)."""
    shares = [bin_shares(ious[ious >= IOU_BINS[0]], IOU_BINS) for _, ious in (run, baseline)]
    diff = shares[0] - shares[1]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    labels = [f"{a:.1f}-{b:.1f}" for a, b in zip(IOU_BINS[:-1], IOU_BINS[1:])]
    ax.bar(labels, diff, color=["tab:green" if d >= 0 else "tab:red" for d in diff])
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xlabel="IoU of true positive", ylabel="% of TPs, difference (points)", title=f"{names[0]} - {names[1]}")
    return _save(fig, path)


def draw_detections(image, instances, gt_boxes, path, *, metadata=None, score_thresh=0.3):
    """Figs. 1 and 6: ``image`` (HxWx3 RGB uint8) with the ground truth in red and the
    detections scoring at least ``score_thresh`` in blue, labelled with class and score."""
    vis = Visualizer(image, metadata)
    keep = instances.scores >= score_thresh
    pred = instances[keep]
    names = (metadata.get("thing_classes", None) if metadata is not None else None) or []
    labels = [
        f"{names[c] if c < len(names) else c} {s:.2f}"
        for c, s in zip(pred.pred_classes.tolist(), pred.scores.tolist())
    ]
    vis.overlay_instances(boxes=np.asarray(gt_boxes).reshape(-1, 4), assigned_colors=[GT_COLOR] * len(gt_boxes))
    out = vis.overlay_instances(
        boxes=pred.pred_boxes.tensor.numpy(), labels=labels, assigned_colors=[PRED_COLOR] * len(pred)
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    out.save(path)
    return path
