"""
Anchor coverage (hqod.evaluation.anchor_coverage, tools/analyze_anchors.py): best-anchor IoU and
positives per box on a hand-made example, the table, and the tool on the tiny dataset.
"""
import os
import subprocess
import sys

import pytest
import torch

from detectron2.structures import Boxes

from hqod.evaluation.anchor_coverage import box_coverage, coverage_table

from helpers import ROOT, tiny_data_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def test_box_coverage_hand_example():
    # two 16 x 16 anchors side by side; box 1 overlaps the first by 12 x 16 = 192 (union 320:
    # IoU 0.6) and the second by 4 x 16 = 64 (union 448: 1/7); box 2 straddles both (8 x 16 each:
    # IoU 128 / 384 = 1/3); box 3 (32 x 16) holds both (IoU 256 / 512 = 0.5 each)
    anchors = Boxes(torch.tensor([[0.0, 0, 16, 16], [16, 0, 32, 16]]))
    gt = Boxes(torch.tensor([[4.0, 0, 20, 16], [8, 0, 24, 16], [0, 0, 32, 16]]))
    cov = box_coverage(anchors, gt, iou_threshold=0.5)
    torch.testing.assert_close(cov["best_iou"], torch.tensor([0.6, 1 / 3, 0.5]))
    assert cov["num_positive"].tolist() == [1, 0, 2]
    torch.testing.assert_close(cov["size"], torch.tensor([16.0, 16.0, 512**0.5]))

    table = coverage_table(cov, 0.5, size_edges=(0, 20, 40))
    assert table.splitlines()[2:] == [
        "| 0-20 | 2 | 0.467 | 50 % | 0.50 |",
        "| 20-40 | 1 | 0.500 | 0 % | 2.00 |",
        "| all | 3 | 0.478 | 33 % | 1.00 |",
    ]


def test_analyze_anchors_tool(tiny_digits):
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.dirname(tiny_digits))
    cmd = [sys.executable, "tools/analyze_anchors.py", "--config-file", "configs/ssdlite_mv2_fp32.py", "--images", "4",
           *tiny_data_overrides()]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| box size (px) | boxes | mean best IoU | best IoU < 0.5 | positives per box |" in r.stdout
    boxes = int(r.stdout.split("| all | ")[1].split(" |")[0])
    assert boxes >= 4  # every tiny scene has at least one digit
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert again.stdout == r.stdout  # --seed (default 0) fixes the images and their augmentation

    r = subprocess.run([sys.executable, "tools/analyze_anchors.py", "--config-file", "configs/fcos_r18_fp32.py"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr and "has no IoU anchor matcher" in r.stderr
