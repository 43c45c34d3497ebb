"""
YOLOX-tiny (CSPDarknet + PAFPN), HQOD's Table II lightweight detector: SimOTA and the losses on
hand-made examples whose answers are written here; HQOD on SimOTA's positives; quantization with
the 8-bit stem and nine predictors counted; the configs trained, quantized, fine-tuned with HQOD
and evaluated through ``do_train``.
"""
import math

import pytest
import torch

from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from hqod.engine import build_model
from hqod.modeling import HQODYOLOX, YOLOX, CSPDarknet, simota_assign
from hqod.quantization import QConv2d, quantize_model

from helpers import ROOT, calibrate_random_model, fp32_then_qat, sgd_totals, synthetic_batches

NUM_CLASSES = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(config="configs/yolox_tiny_fp32.py", num_classes=NUM_CLASSES):
    """``config`` with a third of YOLOX-tiny's widths (stages 16 .. 128, PAFPN 32)."""
    cfg = LazyConfig.load(f"{ROOT}/{config}")
    cfg.model.num_classes = num_classes
    cfg.model.backbone.bottom_up.widen_factor = 0.125
    cfg.model.backbone.out_channels = 32
    return cfg


def small_model(hqod=False):
    cfg = small_cfg()
    cfg.model._target_ = HQODYOLOX if hqod else YOLOX
    torch.manual_seed(0)
    return instantiate(cfg.model)


# ------------------------------------------------------------------------------- SimOTA
def _simota_case():
    # stride-8 priors with cell centres (4, 4), (12, 4), (4, 12), (100, 100); predictions
    # [0, 0, 16, 16], [0, 0, 8, 16], [0, 0, 16, 4] and one far away
    centers = torch.tensor([[4.0, 4], [12, 4], [4, 12], [100, 100]])
    strides = torch.full((4,), 8.0)
    boxes = torch.tensor([[0.0, 0, 16, 16], [0, 0, 8, 16], [0, 0, 16, 4], [96, 96, 104, 104]])
    scores = torch.full((4, 2), 0.25)  # equal class costs: BCE(0.5, one-hot) = 2 log 2
    return scores, centers, strides, boxes


def test_simota_takes_the_cheapest_candidates_hand_example():
    scores, centers, strides, boxes = _simota_case()
    gt = torch.tensor([[0.0, 0, 16, 16]])
    # candidates: the three priors whose centre is in the box; IoUs 1, 0.5, 0.25 -> k =
    # int(1.75) = 1: the cheapest, prediction 0 (cost 2 log 2 + 3 x -log(1 + 1e-7))
    matched, ious = simota_assign(scores, centers, strides, boxes, gt, torch.tensor([0]), num_classes=2)
    assert matched.tolist() == [0, -1, -1, -1]
    torch.testing.assert_close(ious, torch.tensor([1.0, 0, 0, 0]))


def test_simota_prior_taken_twice_keeps_the_cheaper_ground_truth():
    scores, centers, strides, boxes = _simota_case()
    # a second ground truth [2, 0, 18, 16]: IoUs 224 / 288 = 0.778, 96 / 288 = 0.333, 56 / 264 =
    # 0.212 -> k = 1, also prediction 0; there its cost (-log 0.778) exceeds the first's (-log 1):
    # prediction 0 stays with ground truth 0 and ground truth 1 is left without a prior
    gt = torch.tensor([[0.0, 0, 16, 16], [2, 0, 18, 16]])
    matched, ious = simota_assign(scores, centers, strides, boxes, gt, torch.tensor([0, 1]), num_classes=2)
    assert matched.tolist() == [0, -1, -1, -1] and ious[0].item() == pytest.approx(1.0)
    # k grows with the IoUs: predictions [0, 0, 16, 16] and [0, 0, 16, 15] (IoU 240 / 256 =
    # 0.9375) and [0, 0, 16, 4] (0.25) sum to 2.19 -> k = 2, the two cheapest
    boxes[1] = torch.tensor([0.0, 0, 16, 15])
    matched, ious = simota_assign(scores, centers, strides, boxes, gt[:1], torch.tensor([1]), num_classes=2)
    assert matched.tolist() == [0, 0, -1, -1]
    torch.testing.assert_close(ious, torch.tensor([1.0, 0.9375, 0, 0]))
    # no ground truth: all background
    matched, ious = simota_assign(scores, centers, strides, boxes, gt[:0], torch.tensor([], dtype=torch.long), num_classes=2)
    assert matched.tolist() == [-1] * 4 and not ious.any()


# ------------------------------------------------------------------------------- losses
def _hand_loss_inputs():
    """One image, 2 classes, two stride-8 priors on the grid points (0, 0) and (8, 0): prior 0 a
    positive of class 1 whose prediction had IoU 0.5 with its box at assignment, prior 1
    background."""
    anchors = [Boxes(torch.tensor([[-4.0, -4, 4, 4], [4, -4, 12, 4]]))]
    logits = torch.tensor([[[0.0, 0.0], [3.0, -3.0]]], requires_grad=True)
    deltas = torch.tensor([[[0.0, 0.0, math.log(2.0), 0.0], [0.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    objectness = torch.tensor([[[2.0], [-1.0]]], requires_grad=True)
    labels = [torch.tensor([1, 2])]
    gt_boxes = [torch.tensor([[-4.0, -4, 4, 4], [0, 0, 0, 0]])]
    gt_ious = [torch.tensor([0.5, 0.0])]
    return anchors, [logits], labels, [deltas], gt_boxes, [objectness], gt_ious


def test_yolox_losses_hand_example():
    model = small_model()
    model.num_classes = 2
    with EventStorage():
        losses = model.losses(*_hand_loss_inputs())
    # class: BCE of logits (0, 0) against (0, 1 x 0.5): log 2 each
    assert losses["loss_cls"].item() == pytest.approx(2 * math.log(2), abs=1e-6)
    # box: the prediction is twice as wide as its box [-4, -4, 4, 4]: IoU 64 / 128 = 0.5,
    # 5 x (1 - 0.5^2) = 3.75
    assert losses["loss_box_reg"].item() == pytest.approx(3.75, abs=1e-5)
    # objectness: log(1 + e^-2) (positive, logit 2) + log(1 + e^-1) (background, logit -1)
    assert losses["loss_obj"].item() == pytest.approx(0.126928 + 0.313262, abs=1e-5)
    assert model.loss_normalizer == 1.0 and "loss_l1" not in losses
    model.l1_loss_weight = 1.0
    with EventStorage():
        losses = model.losses(*_hand_loss_inputs())
    # L1 of the deltas (0, 0, log 2, 0) against the box's (0, 0, log(1 + 1e-8), log(1 + 1e-8))
    assert losses["loss_l1"].item() == pytest.approx(math.log(2), abs=1e-6)


def test_hqod_yolox_on_simota_positives():
    model = small_model(hqod=True)
    model.num_classes = 2
    inputs = _hand_loss_inputs()
    p, u = model.harmony_pairs(*inputs[:5])
    # p: sigmoid of the ground-truth class's logit (0 -> 0.5), objectness not multiplied in;
    # u: IoU of the decoded prediction with its box
    assert p.tolist() == [0.5] and u.item() == pytest.approx(0.5, abs=1e-6)
    with EventStorage():
        losses = model.losses(*inputs)
    assert {"loss_tcorr", "loss_hiou", "loss_obj"} <= losses.keys()
    # HIoU (sigma 1.5): 1.5 x (1 - u)(1 + u)^0.8, not scaled by the box loss weight
    assert losses["loss_hiou"].item() == pytest.approx(1.5 * 0.5 * 1.5 ** 0.8, abs=1e-5)
    sum(losses.values()).backward()
    assert torch.isfinite(inputs[1][0].grad).all() and inputs[3][0].grad.abs().sum() > 0


def test_diverged_predictions_are_one_clear_error():
    model = small_model()
    anchors, logits, _, deltas, _, objectness, _ = _hand_loss_inputs()
    logits = [logits[0].detach().clone()]
    logits[0][0, 1, 0] = float("nan")
    gt = [next(synthetic_batches(1))[0]["instances"]]
    with pytest.raises(FloatingPointError, match="training has diverged"):
        model.label_anchors(anchors, logits, deltas, objectness, gt)


def test_yolox_loss_falls_with_sgd():
    batch = next(synthetic_batches(1, size=128, per_batch=2))
    # per positive: SimOTA gives more positives as the boxes improve
    totals, _ = sgd_totals(small_model(hqod=True), batch, steps=20, lr=0.01)
    assert all(math.isfinite(t) for t in totals)
    assert sum(totals[-3:]) / 3 < 0.8 * totals[0], totals  # 14.9 -> 10.6 here


def test_cspdarknet_tiny_shapes():
    net = CSPDarknet()  # YOLOX-tiny's: widths 24 (stem), 48, 96, 192, 384; blocks 1, 3, 3, 1
    out = net(torch.zeros(1, 3, 64, 96))
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {"stage2": (96, 8, 12), "stage3": (192, 4, 6), "stage4": (384, 2, 3)}
    assert [len(getattr(net, f"stage{i}")[-1].blocks) for i in range(1, 5)] == [1, 3, 3, 1]


# ------------------------------------------------------------------------- quantization
def test_quantized_yolox_8bit_stem_and_nine_predictors():
    model = build_model(small_cfg("configs/yolox_tiny_lsq_w4_hqod.py"))
    assert type(model) is HQODYOLOX
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert all(isinstance(m, QConv2d) for m in convs.values())
    eight_bit = sorted(n for n, m in convs.items() if m.weight_quant.bits == 8)
    predictors = [f"head.{p}.{i}" for p in ("cls_score", "bbox_pred", "objectness") for i in range(3)]
    assert eight_bit == sorted(["backbone.bottom_up.stem.conv"] + predictors)
    assert all(m.weight_quant.bits == m.input_quant.bits == 4 for n, m in convs.items() if n not in eight_bit)
    assert all(convs[n].input_quant.signed for n in predictors)  # after SiLU: signed


def test_yolox_refuses_aqd_scope():
    # AQD's integer BN outputs and adds need ReLU-family activations; YOLOX's convs apply SiLU
    with pytest.raises(ValueError, match="backbone.bottom_up.stem.conv applies SiLU.*scope 'aqd_star'"):
        quantize_model(instantiate(small_cfg().model), dict(method="lq", scope="aqd", weight_bits=4, act_bits=4))


# ---------------------------------------------------------------------- the configs, end to end
def test_yolox_configs_train_quantize_and_evaluate(tiny_digits, tmp_path):
    model, results, metrics = fp32_then_qat(
        small_cfg("configs/yolox_tiny_fp32.py", num_classes=10), small_cfg("configs/yolox_tiny_lsq_w4_hqod.py", num_classes=10), tmp_path
    )
    assert type(model) is HQODYOLOX and model.harmony == "hqod"
    assert '"loss_tcorr"' in metrics and "loss_obj" in metrics
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75"} and 0.0 <= results["bbox"]["AP"] <= 100.0


# ----------------------------------------------------------------------------- deployment
def test_yolox_exports_to_onnx_runtime(tmp_path):
    from hqod.deploy import DetectorNetwork, OnnxDetector, export_onnx, prepare_for_export
    from hqod.deploy.runtime import executed_kernels

    from test_deploy import _ort_outputs

    torch.manual_seed(0)
    model = calibrate_random_model(instantiate(small_cfg().model), dict(method="lsq", weight_bits=4, act_bits=4), size=128)
    path, optimized = str(tmp_path / "yolox.onnx"), str(tmp_path / "opt.onnx")
    info = export_onnx(model, path, image_size=(128, 128))
    assert info["quantized_convs"] == 83
    assert info["outputs"] == [f"{p}.{level}" for p in ("cls_score", "bbox_pred", "objectness") for level in range(3)]
    OnnxDetector(model, path, optimized_model=optimized)
    # every conv is followed by SiLU (x * sigmoid(x), fused as QuickGelu) before the next Q, so
    # ONNX Runtime fuses none into QLinearConv: the file is exact but runs float convs
    kernels = executed_kernels(optimized)
    assert kernels["Conv"] == 83 and "QLinearConv" not in kernels
    images = model.preprocess_image(next(synthetic_batches(1, seed=3, size=128))).tensor
    with torch.no_grad():
        ref = DetectorNetwork(prepare_for_export(model))(images)
    for r, o in zip(ref, _ort_outputs(path, images, optimize=False)):
        assert (r - o).abs().max() <= 1e-5 * r.abs().max()
