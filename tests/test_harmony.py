"""HarmonyEvaluator and its figures on hand-made cases whose answers are written out here."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluators
from detectron2.structures import Boxes, BoxMode, Instances

from hqod.evaluation import HarmonyEvaluator, harmony_metrics, match_detections
from hqod.evaluation.harmony_plots import (
    draw_detections,
    load_tp_records,
    plot_gap_histogram,
    plot_iou_bin_difference,
    plot_score_iou_density,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Ground truth of one image: A (class 0), B (class 1), a crowd box C (class 0).
GT_BOXES = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]])
GT_CLASSES = torch.tensor([0, 1, 0])
GT_CROWD = torch.tensor([False, False, True])


def detections():
    """d0 on A (IoU 1, score 0.9); d1 on A, higher score (IoU 0.8, score 0.95) so it takes A
    first and d0 becomes a false positive; d2 on B but class 0 (FP); d3 on B (IoU exactly 0.5,
    a TP); d4 exactly on the crowd box (never a TP); d5 near A with IoU 0.49 (FP)."""
    boxes = torch.tensor(
        [[0.0, 0, 10, 10], [0, 0, 10, 8], [20, 20, 30, 30], [20, 20, 30, 25], [40, 40, 50, 50], [0, 0, 4.9, 10]]
    )
    scores = torch.tensor([0.9, 0.95, 0.8, 0.3, 0.7, 0.6])
    classes = torch.tensor([0, 0, 0, 1, 0, 0])
    return boxes, scores, classes


def test_match_detections_greedy_by_score():
    boxes, scores, classes = detections()
    tp_scores, tp_ious = match_detections(boxes, scores, classes, GT_BOXES, GT_CLASSES, GT_CROWD)
    np.testing.assert_allclose(tp_scores, [0.95, 0.3], rtol=1e-6)
    np.testing.assert_allclose(tp_ious, [0.8, 0.5], rtol=1e-6)


def test_match_detections_empty():
    boxes, scores, classes = detections()
    for args in [(boxes[:0], scores[:0], classes[:0], GT_BOXES, GT_CLASSES), (boxes, scores, classes, GT_BOXES[:0], GT_CLASSES[:0])]:
        s, u = match_detections(*args)
        assert len(s) == len(u) == 0


def test_harmony_metrics_hand_computed():
    # gaps 0.15, 0.25, 0.05, 0.18 -> mean 0.1575; (p, u) both >= 0.7 for 3 of 4
    m = harmony_metrics([0.95, 0.3, 0.8, 0.72], [0.8, 0.55, 0.75, 0.9])
    assert m["num_tp"] == 4
    assert m["mean_gap"] == pytest.approx(0.1575)
    assert m["ideal"] == pytest.approx(75.0)
    # p - mean = .2575, -.3925, .1075, .0275; u - mean = .05, -.2, 0, .15
    assert m["corr"] == pytest.approx(0.0955 / (0.232675 * 0.065) ** 0.5)
    assert m["gap_0.0-0.1"] == pytest.approx(25.0)
    assert m["gap_0.1-0.2"] == pytest.approx(50.0)
    assert m["gap_0.2-0.3"] == pytest.approx(25.0)
    assert sum(v for k, v in m.items() if k.startswith("gap_")) == pytest.approx(100.0)
    # IoUs 0.8, 0.55, 0.75, 0.9: one in each of [0.5, 0.6), [0.7, 0.8), [0.8, 0.9), [0.9, 1.0]
    assert [m[f"tp_iou_{b}"] for b in ("0.5-0.6", "0.6-0.7", "0.7-0.8", "0.8-0.9", "0.9-1.0")] == pytest.approx([25, 0, 25, 25, 25])


def test_harmony_metrics_edges():
    m = harmony_metrics([1.0, 0.5], [1.0, 1.0])  # gaps 0 and 0.5; IoU 1.0 falls in the last bin
    assert m["gap_0.0-0.1"] == pytest.approx(50.0)
    assert m["gap_0.5-0.6"] == pytest.approx(50.0)
    assert m["tp_iou_0.9-1.0"] == pytest.approx(100.0)
    empty = harmony_metrics([], [])
    assert empty["num_tp"] == 0 and np.isnan(empty["mean_gap"]) and np.isnan(empty["corr"])
    assert np.isnan(m["corr"])  # all IoUs equal: no correlation defined


@pytest.fixture
def hand_dataset():
    name = "hqod_test_harmony_hand"
    anns = [
        {"bbox": b.tolist(), "bbox_mode": BoxMode.XYXY_ABS, "category_id": int(c), "iscrowd": int(k)}
        for b, c, k in zip(GT_BOXES, GT_CLASSES, GT_CROWD)
    ]
    records = [
        {"image_id": 7, "file_name": "x.png", "height": 64, "width": 64, "annotations": anns},
        {"image_id": 8, "file_name": "y.png", "height": 64, "width": 64, "annotations": []},
    ]
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).thing_classes = ["zero", "one"]
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _instances(boxes, scores, classes):
    inst = Instances((64, 64))
    inst.pred_boxes, inst.scores, inst.pred_classes = Boxes(boxes), scores, classes
    return inst


def test_evaluator_beside_others(hand_dataset, tmp_path):
    """In detectron2's DatasetEvaluators: the image without ground truth adds no TP, the hand
    image adds the two TPs above; harmony_tp.json holds them."""
    ev = HarmonyEvaluator(hand_dataset, output_dir=str(tmp_path), distributed=False)
    evaluators = DatasetEvaluators([ev])
    evaluators.reset()
    boxes, scores, classes = detections()
    evaluators.process([{"image_id": 7}], [{"instances": _instances(boxes, scores, classes)}])
    evaluators.process([{"image_id": 8}], [{"instances": _instances(boxes, scores, classes)}])
    res = evaluators.evaluate()["harmony"]
    assert res["num_tp"] == 2
    assert res["mean_gap"] == pytest.approx((0.15 + 0.2) / 2, rel=1e-6)
    assert res["ideal"] == pytest.approx(50.0)
    with open(tmp_path / "harmony_tp.json") as f:
        data = json.load(f)
    assert data["image_id"] == [7, 7]
    scores_, ious_ = load_tp_records(str(tmp_path))
    np.testing.assert_allclose(scores_, [0.95, 0.3], rtol=1e-6)
    np.testing.assert_allclose(ious_, [0.8, 0.5], rtol=1e-6)


def test_figures_are_written(tmp_path, hand_dataset):
    rng = np.random.default_rng(0)
    runs = {name: (rng.uniform(0, 1, 200), rng.uniform(0.5, 1, 200)) for name in ("a", "b")}
    paths = [
        plot_score_iou_density(runs, str(tmp_path / "density.png")),
        plot_gap_histogram(runs, str(tmp_path / "gap.png")),
        plot_iou_bin_difference(runs["a"], runs["b"], str(tmp_path / "diff.png"), names=("a", "b")),
    ]
    boxes, scores, classes = detections()
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    paths.append(draw_detections(image, _instances(boxes, scores, classes), GT_BOXES.numpy(), str(tmp_path / "vis.png"), metadata=MetadataCatalog.get(hand_dataset)))
    for p in paths:
        assert os.path.getsize(p) > 1000
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_metrics_in_training_events_and_analyze_harmony_cli(tiny_digits, tmp_path):
    """A tiny training logs harmony/* metrics to the event storage (metrics.json), then
    tools/analyze_harmony.py compares its checkpoint with itself: same metrics, all files."""
    from test_train_net import TINY, train_net

    datasets = os.path.dirname(tiny_digits)
    out = str(tmp_path / "run")
    cfg = ["--config-file", "configs/retina_r18_fp32.py"]
    r = train_net(*cfg, *TINY, f"train.output_dir={out}", "train.max_iter=2", "train.eval_period=2", datasets=datasets)
    assert r.returncode == 0, r.stderr[-3000:]
    events = [json.loads(x) for x in open(os.path.join(out, "metrics.json"))]
    assert any("harmony/mean_gap" in e and "harmony/gap_0.0-0.1" in e for e in events)
    with open(os.path.join(out, "inference", "results.json")) as f:
        assert {"bbox", "harmony"} <= set(json.load(f))

    ana = str(tmp_path / "analysis")
    env = dict(os.environ, DETECTRON2_DATASETS=datasets)
    cmd = [sys.executable, "tools/analyze_harmony.py", *cfg, "--checkpoint", f"{out}/model_final.pth",
           "--baseline-config-file", "configs/retina_r18_fp32.py", "--baseline-checkpoint", f"{out}/model_final.pth",
           "--output-dir", ana, "--vis-images", "2", "--vis-score", "0.0", *TINY]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| run | AP |" in r.stdout
    with open(os.path.join(ana, "harmony.json")) as f:
        res = json.load(f)
    assert list(res) == ["retina_r18_fp32", "retina_r18_fp32_baseline"]
    assert res["retina_r18_fp32"] == res["retina_r18_fp32_baseline"]
    files = set(os.listdir(ana))
    assert {"score_iou_density.png", "gap_histogram.png", "iou_bin_difference.png", "vis"} <= files
    assert len(os.listdir(os.path.join(ana, "vis"))) == 4

    missing = str(tmp_path / "missing")
    r = subprocess.run([sys.executable, "tools/analyze_harmony.py", "--config-file", "configs/retina_r18_lsq_w2.py",
                        "--checkpoint", f"{missing}/model_final.pth", "--output-dir", f"{missing}/analysis"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "train it first" in r.stderr and "--checkpoint" in r.stderr
    assert not os.path.exists(missing)  # nothing written for a command that cannot run
