"""
SSD-lite (MobileNetV2), HQOD's Table II lightweight detector: SSD's priors, matching, hard
negative mining and losses on hand-made examples whose answers are written here; HQOD's p as the
softmax score; quantization with the depthwise convs and the 8-bit stem and predictors counted;
and the configs trained, quantized, fine-tuned with HQOD and evaluated through ``do_train``.
"""
import math

import pytest
import torch

from detectron2.config import LazyConfig, instantiate
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from hqod.engine import build_model
from hqod.modeling import HQODSSD, SSD, MobileNetV2, SSDAnchorGenerator, SSDLiteHead, SSDLiteNeck, hard_negative_mask
from hqod.modeling.dense_head import DenseHeadSpec, check_dense_head
from hqod.quantization import QConv2d, QInvertedResidual, QMobileNetV2, set_integer_aware, to_integer
from hqod.quantization.integer_layers import aligned_add
from hqod.quantization.modules import add_alignment
from hqod.quantization.integer import IntConvUnit, IntegerConversionError

from helpers import ROOT, calibrate_random_model, fp32_then_qat, sgd_totals, synthetic_batches

NUM_CLASSES = 3
EXTRA_CHANNELS = [32, 16, 16]  # the digits preset: three extra levels


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(config="configs/ssdlite_mv2_fp32.py", num_classes=NUM_CLASSES):
    """``config`` with MobileNetV2 at width 0.25 (layer3, layer5, conv_last: 8, 24 and 1280
    channels) and narrow extra levels."""
    cfg = LazyConfig.load(f"{ROOT}/{config}")
    cfg.model.num_classes = num_classes
    cfg.model.backbone.bottom_up.width_mult = 0.25
    cfg.model.backbone.extra_channels = EXTRA_CHANNELS
    cfg.model.head.input_shape = [ShapeSpec(channels=c) for c in [8, 24, 1280] + EXTRA_CHANNELS]
    return cfg


def small_model(hqod=False):
    cfg = small_cfg()
    cfg.model._target_ = HQODSSD if hqod else SSD
    torch.manual_seed(0)
    return instantiate(cfg.model)


# ------------------------------------------------------------------------------- priors
def test_ssd_priors_of_one_cell():
    # min 16, max 40, ratios 2 and 3: squares of 16 and sqrt(640) = 25.2982, then
    # 16 x sqrt(2) = 22.6274 by 16 / sqrt(2) = 11.3137, and 16 x sqrt(3) = 27.7128 by 9.2376
    gen = SSDAnchorGenerator(min_sizes=[16], max_sizes=[40], aspect_ratios=[2.0, 3.0], strides=[16])
    half_wh = torch.tensor([
        [8.0, 8.0], [12.6491, 12.6491], [11.3137, 5.6569], [5.6569, 11.3137], [13.8564, 4.6188], [4.6188, 13.8564],
    ])
    assert gen.num_cell_anchors == [6]
    torch.testing.assert_close(list(gen.cell_anchors)[0], torch.cat([-half_wh, half_wh], dim=1), atol=1e-4, rtol=0)
    # a 1 x 2 map of stride 16: the cells' centres (8, 8) and (24, 8)
    anchors = gen([torch.zeros(1, 1, 1, 2)])[0].tensor
    assert anchors.shape == (12, 4)
    torch.testing.assert_close(anchors[6], torch.tensor([24.0 - 8, 0.0, 24.0 + 8, 16.0]))


# ----------------------------------------------------------------------------- matching
def test_ssd_matching_hand_example():
    model = small_model()
    anchors = [Boxes(torch.tensor([[0.0, 0, 10, 10], [0, 0, 20, 20], [50, 50, 60, 60], [100, 100, 110, 110]]))]
    gt = Instances((128, 128), gt_boxes=Boxes(torch.tensor([[0.0, 0, 18, 18], [52, 52, 70, 70]])), gt_classes=torch.tensor([1, 0]))
    # IoU(gt0, a1) = 324 / 400 = 0.81 >= 0.5: class 1. gt1's best anchor is a2 at IoU
    # 64 / 360 = 0.18 < 0.5, matched all the same (each ground truth gets its best prior).
    # a0 (IoU 100 / 324 = 0.31 with gt0) and a3 are background (label 3).
    labels, boxes = model.label_anchors(anchors, [gt])
    assert labels[0].tolist() == [3, 1, 0, 3]
    torch.testing.assert_close(boxes[0][1:3], torch.tensor([[0.0, 0, 18, 18], [52, 52, 70, 70]]))
    empty = Instances((128, 128), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0, dtype=torch.long))
    labels, boxes = model.label_anchors(anchors, [empty])
    assert labels[0].tolist() == [3, 3, 3, 3] and not boxes[0].any()


def test_hard_negative_mask_keeps_the_largest_losses_per_image():
    losses = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3], [0.4, 0.2, 0.8, 0.6, 0.1]])
    negatives = torch.tensor([[False, True, True, True, True], [True, True, True, False, True]])
    kept = hard_negative_mask(losses, negatives, torch.tensor([2, 9]))
    # image 0: the two largest negatives 0.9 and 0.7; image 1: all 4 negatives (fewer than 9)
    assert kept.tolist() == [[False, True, False, True, False], [True, True, True, False, True]]


# ------------------------------------------------------------------------------- losses
def _hand_loss_inputs():
    """One image, five anchors, 3 classes + background: anchor 0 a positive of class 0 on its
    own ground-truth box, anchors 1-4 background."""
    anchors = [Boxes(torch.tensor([[0.0, 0, 10, 10]] + [[20.0, 20, 30, 30]] * 4))]
    logits = torch.tensor([[[2.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 2], [1, 0, 0, 0], [0, 0, 0, 1]]], requires_grad=True)
    deltas = torch.tensor([[[1.5, 0.0, 0.0, -0.2]] + [[0.0] * 4] * 4], requires_grad=True)
    labels = [torch.tensor([0, 3, 3, 3, 3])]
    gt_boxes = [torch.tensor([[0.0, 0, 10, 10]] * 5)]
    return anchors, [logits], labels, [deltas], gt_boxes


def test_ssd_losses_hand_example():
    model = small_model()
    with EventStorage():
        losses = model.losses(*_hand_loss_inputs())
    # cross-entropy over 4 outputs: the positive log(1 + 3 e^-2) = 0.340753; the negatives
    # log 4 = 1.386294, log(1 + 3 e^-2) = 0.340753, log(e + 3) = 1.743668, log(e + 3) - 1 =
    # 0.743668; 1 positive x 3 keeps the 3 largest (1.743668, 1.386294, 0.743668)
    assert losses["loss_cls"].item() == pytest.approx(0.340753 + 1.743668 + 1.386294 + 0.743668, abs=1e-5)
    # target deltas 0 (the box is the anchor); smooth L1 (beta 1): 1.5 - 0.5 + 0.5 x 0.2^2
    assert losses["loss_box_reg"].item() == pytest.approx(1.02, abs=1e-6)
    assert model.loss_normalizer == 1  # the number of positives


def test_hqod_ssd_scores_are_softmax_of_the_ground_truth_class():
    model = small_model(hqod=True)
    inputs = _hand_loss_inputs()
    p, u = model.harmony_pairs(*inputs)
    # softmax of (2, 0, 0, 0) at class 0: e^2 / (e^2 + 3); the predicted box: deltas
    # (1.5, 0, 0, -0.2) / (10, 10, 5, 5) on the 10 x 10 anchor = x shift 1.5 px, height x e^-0.04
    assert p.item() == pytest.approx(math.exp(2) / (math.exp(2) + 3), abs=1e-6)
    h = 10 * math.exp(-0.04)
    inter = 8.5 * h
    assert u.item() == pytest.approx(inter / (100 + 10 * h - inter), abs=1e-5)
    with EventStorage():
        losses = model.losses(*inputs)
    assert {"loss_tcorr", "loss_hiou"} <= losses.keys()
    sum(losses.values()).backward()
    assert inputs[1][0].grad is not None and torch.isfinite(inputs[1][0].grad).all()
    with pytest.raises(ValueError, match="positive_losses"):
        cfg = small_cfg("configs/ssdlite_mv2_lsq_w4_hqod.py")
        cfg.model.harmony = "hardet"
        instantiate(cfg.model)


def test_ssd_loss_falls_with_sgd():
    # 256 px: SSD's last levels are 1 x 1 maps whose BN statistics a smaller input makes noisier
    batch = next(synthetic_batches(1, size=256, per_batch=4))
    totals, _ = sgd_totals(small_model(hqod=True), batch, steps=15, lr=0.003)  # same batch: same normalizer
    assert all(math.isfinite(t) for t in totals)
    # hard negative mining picks other negatives every step: the last three steps' mean
    assert sum(totals[-3:]) / 3 < 0.75 * totals[0], totals


# ------------------------------------------------------------------------- quantization
def test_quantized_ssdlite_depthwise_convs_and_8bit_first_last():
    cfg = small_cfg("configs/ssdlite_mv2_lsq_w4_hqod.py")
    model = build_model(cfg)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert all(isinstance(m, QConv2d) for m in convs.values())
    depthwise = [n for n, m in convs.items() if m.groups > 1]
    # 17 blocks, 3 extra levels, 6 levels x 2 towers
    assert len(depthwise) == 17 + 3 + 12 and all(convs[n].groups == convs[n].in_channels for n in depthwise)
    eight_bit = sorted(n for n, m in convs.items() if m.weight_quant.bits == 8)
    assert eight_bit == sorted(["backbone.bottom_up.stem"] + [f"head.{p}.{i}" for p in ("bbox_pred", "cls_score") for i in range(6)])
    assert all(m.weight_quant.bits == m.input_quant.bits == 4 for n, m in convs.items() if n not in eight_bit)
    unsigned = {n for n, m in convs.items() if not m.input_quant.signed}
    # after a ReLU6: the predictors, the blocks' depthwise and projection convs, the first
    # block (reads the stem), the extra levels; the blocks' expansions read linear projections
    assert {"head.cls_score.0", "head.bbox_pred.5", "backbone.bottom_up.layer1.0.conv.0", "backbone.extras.0.0",
            "backbone.extras.2.0", "backbone.bottom_up.layer2.0.conv.1", "backbone.bottom_up.layer2.0.conv.2"} <= unsigned
    assert not {"backbone.bottom_up.stem", "backbone.bottom_up.layer2.0.conv.0", "backbone.bottom_up.conv_last"} & unsigned


def test_ssdlite_aqd_scope_quantizes_the_inverted_residual_adds():
    torch.manual_seed(0)
    aqd = dict(method="lq", scope="aqd", weight_bits=4, act_bits=4)
    model = calibrate_random_model(instantiate(small_cfg().model), aqd, size=128)
    net = model.backbone.bottom_up
    assert isinstance(net, QMobileNetV2)
    # the blocks that keep their shape (stride 1, same width): at width 0.25 layer1's (8 -> 8
    # channels) and the 10 of MobileNetV2 at any width
    residual = {n: m for n, m in net.named_modules() if isinstance(m, QInvertedResidual)}
    assert list(residual) == ["layer1.0", "layer2.1", "layer3.1", "layer3.2", "layer4.1", "layer4.2", "layer4.3", "layer5.1", "layer5.2", "layer6.1", "layer6.2"]
    assert all(m.add_quant.bits == 8 and m.add_quant.signed for m in residual.values())
    # each block's input grid: the projection BN output of the block before, or its sum
    inputs = {id(block): q for block, q in net.block_inputs()}
    assert inputs[id(net.layer2[1])] is net.layer2[0].conv[-1].norm.output_quant
    assert inputs[id(net.layer3[2])] is net.layer3[1].add_quant
    assert inputs[id(net.layer1[0])] is None  # reads the stem's ReLU6

    block, seen = net.layer3[2], {}
    block.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    with torch.no_grad():
        model(next(synthetic_batches(1, seed=3, size=128)))
        x, input_quant = seen["args"]
        step = block.add_quant.integer_grid().scale
        units = seen["out"] / step  # the sum lies on its quantizer's grid
        assert (units - units.round()).abs().max() < 1e-3 and units.abs().max() > 1
        # Eq. 7: the projection's integers (BN output grid) and the input's (layer3.1's sum)
        # aligned by c / 2^d, then the sum quantized; integer-aware off: the float sum
        projection = block.conv(x)
        alignment = add_alignment(block.conv[-1].norm.output_quant, net.layer3[1].add_quant)
        assert alignment is not None and alignment.d >= 8
        assert torch.equal(seen["out"], block.add_quant(aligned_add(projection, x, alignment)))
        set_integer_aware(model, False)  # (the convs' BN too: float)
        assert torch.equal(block(x, input_quant), block.add_quant(block.conv(x) + x))
    # at width 0.25 the first block keeps the stem's width: its add reads the stem's ReLU6
    # output, which lies on no grid (a float add in the fake-quant model too)
    with pytest.raises(IntegerConversionError, match="layer1.0 adds its input, the stem's ReLU6 output"):
        to_integer(set_integer_aware(model, True))
    # a neck the engine does not know (a subclass may compute anything): one error naming it
    model.backbone.__class__ = type("OtherNeck", (SSDLiteNeck,), {})
    with pytest.raises(IntegerConversionError, match="built on OtherNeck over QMobileNetV2"):
        to_integer(model)


def test_ssdlite_aqd_integer_engine_is_exact():
    """SSD-lite AQD W4A4 (width 0.5) through the integer engine: MobileNetV2's blocks with their
    Eq. 7 adds, the ReLU6 clips, the extra levels and the per-level head compute the float64
    fake-quant model exactly."""
    from hqod.quantization.integer import IntegerMobileNetV2, IntegerPerLevelHead, IntegerSSDLiteNeck, integer_summary
    from hqod.quantization.integer_check import compare_integer_model

    cfg = small_cfg()
    cfg.model.backbone.bottom_up.width_mult = 0.5  # layer3, layer5, conv_last: 16, 48, 1280 channels
    cfg.model.head.input_shape = [ShapeSpec(channels=c) for c in [16, 48, 1280] + EXTRA_CHANNELS]
    cfg.model.test_score_thresh = 0.0
    torch.manual_seed(0)
    model = calibrate_random_model(instantiate(cfg.model), dict(method="lq", scope="aqd", weight_bits=4, act_bits=4), size=128)
    # calibrated on ReLU6 outputs, a reader's range ends at 6 or below; the first block's
    # depthwise conv here reads [0, 12] (as training can make it) on 15 steps of 0.8: the stem's
    # ReLU6 (its BN output grid reaches 15.2; BN scales x 8 to reach past 6 on these images)
    # clips between two of its levels, 6 / 0.8 = 7.5
    model.backbone.bottom_up.stem.norm.weight.data.mul_(8)
    model.backbone.bottom_up.layer1[0].conv[0].input_quant.interval.data.fill_(12.0)
    int_model = to_integer(model)
    assert type(int_model.backbone) is IntegerSSDLiteNeck and type(int_model.backbone.bottom_up) is IntegerMobileNetV2
    assert type(int_model.head) is IntegerPerLevelHead
    # 52 convs in MobileNetV2 (stem, 17 blocks, conv_last), 9 in the extra levels, 24 in the head
    summary = integer_summary(int_model)
    assert summary["conv_units"] == 85 and summary["fits_int32"]
    # ReLU6 on the integers: the reader's top level is the one the quantizer gives 6 (7.5 -> 8,
    # round half to even), the others keep theirs (15; 255 for the 8-bit stem and predictors)
    readers = {u.name: u.levels[0].in_requant.eta_max for u in int_model.modules() if isinstance(u, IntConvUnit)}
    assert readers.pop("backbone.bottom_up.layer1.0.conv.0") == 8 and set(readers.values()) == {15, 255}
    images = model.preprocess_image(next(synthetic_batches(1, seed=3, size=128))).tensor
    with torch.no_grad():
        stem = int_model.backbone.bottom_up.stem(images) * int_model.backbone.bottom_up.stem.units[0].out_scale
    assert (stem > 6.4).float().mean() > 0.01  # values the clip changes (6.4: the level above 6)
    report = compare_integer_model(model, int_model, synthetic_batches(1, seed=3, size=128))
    assert report.float64.max_step_diff < 1e-6 and report.float64.beyond_one_step == 0
    assert report.match_rate_ref64 == 1.0 and report.detections_integer > 0
    assert [len(s) for s in int_model.head.output_scales] == [6, 6]
    assert "cls_score" in report.format() and "per level" in report.format()  # each level its own step


def test_per_level_head_declaration_is_checked():
    head = SSDLiteHead(input_shape=[ShapeSpec(channels=8)] * 2, num_classes=2, num_anchors=6)
    spec = DenseHeadSpec({"cls_score": "cls_towers", "bbox_pred": "bbox_towers"}, shared=False)
    check_dense_head(head, spec)
    assert spec.predictor_layers(head) == ["cls_score.0", "cls_score.1", "bbox_pred.0", "bbox_pred.1"]
    del head.cls_score[1]
    with pytest.raises(ValueError, match="per-level predictor 'cls_score' has 1 levels"):
        check_dense_head(head, spec)
    with pytest.raises(ValueError, match="nn.Sequential"):
        check_dense_head(head, DenseHeadSpec({"cls_score": "cls_towers"}))  # declared as shared
    head.cls_score = torch.nn.Conv2d(8, 18, 1)
    with pytest.raises(ValueError, match="per-level predictor 'cls_score', which is not an nn.ModuleList"):
        check_dense_head(head, spec)


@pytest.mark.parametrize("dataset", ["digits", "coco"])
def test_preset_levels_match_the_backbone(dataset):
    # the preset's levels (digits: from stride 8; COCO: the authors' from stride 16), their
    # widths and their priors' strides agree with what the network computes
    cfg = LazyConfig.load(f"{ROOT}/configs/ssdlite_mv2_fp32.py")
    cfg.dataloader.dataset = dataset
    model = instantiate(cfg.model).eval()
    strides = {"digits": [8, 16, 32, 64, 128, 256], "coco": [16, 32, 64, 128, 256, 512]}[dataset]
    assert list(model.anchor_generator.strides) == strides
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 320, 320))
    levels = [features[f] for f in model.head_in_features]
    assert [f.shape[-1] for f in levels] == [math.ceil(320 / s) for s in strides]
    assert [f.shape[1] for f in levels] == [s.channels for s in instantiate(cfg.model.head.input_shape)]
    cfg.model.anchor_generator.strides = strides[::-1]
    with pytest.raises(ValueError, match="prior strides .* are not those of the levels"):
        instantiate(cfg.model)


def test_mobilenet_v2_shapes():
    net = MobileNetV2(out_features=["layer2", "layer5", "conv_last"])
    out = net(torch.zeros(1, 3, 64, 96))
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {"layer2": (24, 16, 24), "layer5": (96, 4, 6), "conv_last": (1280, 2, 3)}
    assert sum(p.numel() for n, p in net.named_parameters() if "conv_last" not in n) == 1_811_712
    with pytest.raises(ValueError, match="unknown out_features"):
        MobileNetV2(out_features=["res4"])


# ---------------------------------------------------------------------- the configs, end to end
def test_ssdlite_configs_train_quantize_and_evaluate(tiny_digits, tmp_path):
    model, results, metrics = fp32_then_qat(
        small_cfg("configs/ssdlite_mv2_fp32.py", num_classes=10), small_cfg("configs/ssdlite_mv2_lsq_w4_hqod.py", num_classes=10), tmp_path
    )
    assert type(model) is HQODSSD and model.harmony == "hqod"
    assert '"loss_tcorr"' in metrics and "loss_hiou" in metrics
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75"} and 0.0 <= results["bbox"]["AP"] <= 100.0


# ----------------------------------------------------------------------------- deployment
def test_ssdlite_exports_to_onnx_runtime(tmp_path):
    from hqod.deploy import DetectorNetwork, OnnxDetector, export_onnx, prepare_for_export
    from hqod.deploy.qdq import quantize_dequantize
    from hqod.deploy.runtime import executed_kernels, output_steps

    from test_deploy import _ort_outputs

    torch.manual_seed(0)
    model = calibrate_random_model(instantiate(small_cfg().model), dict(method="lsq", weight_bits=4, act_bits=4), size=128)
    path, optimized = str(tmp_path / "ssd.onnx"), str(tmp_path / "opt.onnx")
    info = export_onnx(model, path, image_size=(128, 128))
    assert info["quantized_convs"] == 85
    assert info["outputs"] == [f"{p}.{level}" for p in ("cls_score", "bbox_pred") for level in range(6)]
    OnnxDetector(model, path, optimized_model=optimized)
    # ONNX Runtime fuses a Q/DQ conv into QLinearConv only when its output goes to a Q (the
    # projections feed float residual adds): 52, with the ReLU6 of the 39 expansion and depthwise
    # convs dropped, as every reader's grid here lies within [0, 6] (39 when they kept it)
    assert executed_kernels(optimized)["QLinearConv"] == 52
    # each head tower's ReLU6 moves into the grid of the one predictor that reads it (the level
    # of 6 is above this random model's 8-bit tops: the grids stay as they are); the stem keeps
    # its ReLU6: at width 0.25 the first block adds the stem's output back (a second reader)
    exported = prepare_for_export(model)
    for tower, predictor in (("cls_towers", "cls_score"), ("bbox_towers", "bbox_pred")):
        for level in range(6):
            assert getattr(exported.head, tower)[level][0].activation is None
            top = getattr(model.head, predictor)[level].input_quant.clipped_integer_grid(6.0).eta_max
            assert getattr(exported.head, predictor)[level].input_grid.eta_max == top == 255
    assert isinstance(exported.backbone.bottom_up.stem.activation, torch.nn.ReLU6)
    images = model.preprocess_image(next(synthetic_batches(1, seed=3, size=128))).tensor
    with torch.no_grad():
        ref = DetectorNetwork(prepare_for_export(model))(images)
    for r, o in zip(ref, _ort_outputs(path, images, optimize=False)):  # the file computes the export
        assert (r - o).abs().max() <= 1e-5 * r.abs().max()
    # a reader whose grid reaches above 6 (step 0.5: 7.5, as training can make it) reads its
    # grid clipped at the level of 6 (12) instead of the ReLU6 before it (the expansion conv's BN
    # scaled x 8 so that ReLU6 clips): 6.0 wherever ReLU6 clips, as in the fake-quant model
    block = model.backbone.bottom_up.layer2[0].conv
    block[0].norm.weight.data.mul_(8)
    block[1].input_quant.scale.data.fill_(0.5)
    captured = {}
    block[0].register_forward_hook(lambda m, inputs, output: captured.update(x=inputs[0], y=output))
    with torch.no_grad():
        model.backbone(images)
        reference = block[1].input_quant(captured["y"])
        exported = prepare_for_export(model).backbone.bottom_up.layer2[0].conv
        assert exported[0].activation is None and exported[1].input_grid.eta_max == 12
        read = quantize_dequantize(exported[0](captured["x"]), exported[1].input_grid)
    clipped = captured["y"] == 6.0
    assert clipped.float().mean() > 0.05 and bool((read[clipped] == 6.0).all())
    # elsewhere the same levels but where the folded BN's int32 bias moves a value lying within
    # 1 % of a step of a rounding boundary to the next level (0.16 % of the values here)
    differ = read != reference
    assert (read - reference).abs().max() <= 0.5 and differ.float().mean() < 0.005
    assert bool(((captured["y"][differ] / 0.5 % 1 - 0.5).abs() < 0.01).all())
    steps = output_steps(model)  # per level: each level's predictor has its own scales
    assert [len(s) for s in steps.values()] == [6, 6] and not torch.equal(steps["cls_score"][0], steps["cls_score"][1])


def test_integer_bias_makes_the_export_exact():
    """TQT W4A4 SSD-lite (scope aqd_star) on a random calibrated model: with the BN shifts
    rounded in float at export, 73 % of the head outputs of the export's PyTorch form lie more
    than one output step from the fake-quant model's (measured: 23,928 of 32,832); with
    ``quant.integer_bias`` the model trains on the integer biases the export writes: none here
    (at most float32 noise, which may flip a rare value lying on a rounding boundary: < 1 %)."""
    from hqod.deploy import DetectorNetwork, prepare_for_export
    from hqod.deploy.runtime import output_steps

    beyond = {}
    for integer_bias in (False, True):
        torch.manual_seed(0)
        quant = dict(method="tqt", weight_bits=4, act_bits=4, integer_bias=integer_bias)
        model = calibrate_random_model(instantiate(small_cfg().model), quant, size=128)
        convs = [m for m in model.modules() if isinstance(m, QConv2d)]
        assert all(c.integer_aware == integer_bias for c in convs)
        images = model.preprocess_image(next(synthetic_batches(1, seed=3, size=128))).tensor
        with torch.no_grad():
            ref, out = DetectorNetwork(model)(images), DetectorNetwork(prepare_for_export(model))(images)
        steps = [s for per_level in output_steps(model).values() for s in per_level]
        beyond[integer_bias] = sum(int(((r - o).abs() / s > 1).sum()) for r, o, s in zip(ref, out, steps))
    total = sum(r.numel() for r in ref)
    assert beyond[False] > 0.5 * total and beyond[True] < 0.01 * total


def test_single_reader_pairs_follow_the_wiring():
    """What the export may fold a ReLU6 across: Sequential neighbours, per-level head towers and
    their predictors, MobileNetV2's stem and its first block when nothing else reads the stem."""
    from hqod.deploy.export import _single_reader_pairs
    from hqod.modeling.mobilenet import MobileNetV2

    pairs = dict(_single_reader_pairs(small_model()))
    assert [pairs[f"head.{t}.{level}.0"] for t in ("cls_towers", "bbox_towers") for level in (0, 5)] == [
        "head.cls_score.0", "head.cls_score.5", "head.bbox_pred.0", "head.bbox_pred.5",
    ]
    assert pairs["backbone.bottom_up.layer2.0.conv.0"] == "backbone.bottom_up.layer2.0.conv.1"
    assert "backbone.bottom_up.stem" not in pairs  # width 0.25: layer1.0 adds its input back
    full = dict(_single_reader_pairs(MobileNetV2()))  # width 1.0: 32 -> 16 channels, no residual
    assert full["stem"] == "layer1.0.conv.0"
    assert "stem" not in dict(_single_reader_pairs(MobileNetV2(out_features=("stem", "layer5"))))


def test_relu6_folds_into_the_readers_clipped_grid():
    """ReLU6 then a grid with no negative level = the grid with its top level lowered to the
    level its quantizer gives 6 (what the ONNX export and the integer engine compute), at every
    level and rounding boundary."""
    from hqod.deploy.qdq import quantize_dequantize
    from hqod.quantization.quantizers import LSQQuantizer, TQTQuantizer

    def quantizer(cls, param):
        q = cls(bits=4, signed=False)
        q._param().data.fill_(param)
        q.initialized.fill_(1)
        return q.eval()

    x = torch.linspace(-3.0, 10.0, 1301)  # steps of 0.01
    relu6 = torch.nn.functional.relu6
    # (quantizer, its top level, the top level after ReLU6): LSQ step 0.25 (3.75: within [0, 6],
    # unchanged); LSQ step 0.5 (7.5 -> 12, the level of 6.0); LSQ step 0.48 (7.2; 6 / 0.48 = 12.5
    # rounds half to even -> 12, 5.76); TQT threshold 8 -> step 0.5 as LSQ's
    cases = [
        (quantizer(LSQQuantizer, 0.25), 15, 15), (quantizer(LSQQuantizer, 0.5), 15, 12),
        (quantizer(LSQQuantizer, 0.48), 15, 12), (quantizer(TQTQuantizer, 3.0), 15, 12),
    ]
    for q, top, clipped_top in cases:
        grid, clipped = q.integer_grid(), q.clipped_integer_grid(6.0)
        assert (grid.eta_min, grid.eta_max, clipped.eta_min, clipped.eta_max) == (0, top, 0, clipped_top)
        with torch.no_grad():
            assert torch.equal(quantize_dequantize(x, clipped), q(relu6(x)))
        if top != clipped_top:  # without the clip the grid reaches above 6
            assert float(quantize_dequantize(x, grid).max()) > 6.0


def test_ssdlite_aqd_scope_exports_to_onnx_runtime(tmp_path):
    """Scope aqd on LSQ's grids: BN outputs and MobileNetV2's residual adds (AQD Eq. 7) on
    8-bit grids. The export computes the fake-quant model and ONNX Runtime the export."""
    from hqod.deploy import DetectorNetwork, export_onnx, prepare_for_export
    from hqod.deploy.export import QDQInvertedResidual
    from hqod.deploy.runtime import executed_kernels

    from test_deploy import _ort_outputs

    torch.manual_seed(0)
    model = calibrate_random_model(instantiate(small_cfg().model), dict(method="lsq", scope="aqd", weight_bits=4, act_bits=4), size=128)
    path, optimized = str(tmp_path / "ssd.onnx"), str(tmp_path / "opt.onnx")
    export_onnx(model, path, image_size=(128, 128))
    exported = prepare_for_export(model)
    # the 11 blocks with a residual at width 0.25 (layer1.0's add reads the stem's ReLU6: a plain sum)
    blocks = [n for n, m in exported.named_modules() if isinstance(m, QDQInvertedResidual)]
    assert len(blocks) == 11 and exported.get_submodule(blocks[0]).factors == (1.0, 1.0)
    assert all(exported.get_submodule(n).factors != (1.0, 1.0) for n in blocks[1:])
    _ort_outputs(path, torch.zeros(1, 3, 128, 128), optimized_model=optimized)
    # every conv output is quantized: all but the 12 predictors (float logits and deltas) run
    # as integer kernels
    assert executed_kernels(optimized)["QLinearConv"] == 85 - 12
    images = model.preprocess_image(next(synthetic_batches(1, seed=3, size=128))).tensor
    with torch.no_grad():
        fake_quant = [t for per_level in model.head([model.backbone(images)[f] for f in model.head_in_features]) for t in per_level]
        ref = DetectorNetwork(exported)(images)
    plain = _ort_outputs(path, images, optimize=False)
    for f, r, o in zip(fake_quant, ref, plain):
        scale = float(f.abs().max())
        # equal up to float32 rounding, but for a value within 1e-7 of a level boundary rounded
        # to the other level, which moves what is downstream of it (a wrongly aligned add or
        # folded BN moves every output by ~10 % of the range)
        for a, b in ((f, r), (r, o)):
            assert (a - b).abs().mean() <= 5e-3 * scale and (a - b).abs().max() <= 0.05 * scale
