"""HQOD detectors and ATSS (hqod/modeling/meta_arch): small models on 128x128 inputs, CPU."""
import math
from pathlib import Path

import pytest
import torch

from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.modeling.meta_arch import RetinaNet
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from hqod.modeling.meta_arch import ATSS, HQODATSS, HQODFCOS, HQODRetinaNet, atss_match
from hqod.modeling.meta_arch.fcos import _FCOS_HANDLES_EMPTY_IMAGES
from hqod.modeling.meta_arch.hqod_mixin import stack_boxes

from helpers import sgd_totals

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "configs" / "common" / "models"
NUM_CLASSES = 3
# (parent, HQOD class, model config, inference score threshold low enough to get detections)
DETECTORS = {
    "retinanet": (RetinaNet, HQODRetinaNet, "retinanet", 0.005),
    "fcos": (FCOS, HQODFCOS, "fcos", 0.05),
    "atss": (ATSS, HQODATSS, "atss", 0.005),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(arch: str, hqod: bool, seed: int = 0, **kwargs):
    """The model config of ``arch`` with a 32-channel FPN and a 2-conv head, for speed."""
    parent, hqod_cls, config, score_thresh = DETECTORS[arch]
    cfg = LazyConfig.load(str(MODELS / f"{config}.py")).model
    cfg._target_ = hqod_cls if hqod else parent
    cfg.num_classes = NUM_CLASSES
    cfg.backbone.out_channels = 32  # the head follows (input_shape, conv_dims interpolate it)
    cfg.head.conv_dims = cfg.head.conv_dims[:2]
    cfg.test_score_thresh = score_thresh
    for key, value in kwargs.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    return instantiate(cfg)


def make_batch(num_boxes=(2, 1), seed=0, size=128):
    """Images of ``size`` x ``size`` with the given numbers of boxes (0: no instances)."""
    gen = torch.Generator().manual_seed(seed)
    all_boxes = torch.tensor(
        [[10.0, 20.0, 70.0, 90.0], [60.0, 50.0, 120.0, 110.0], [30.0, 30.0, 62.0, 58.0]]
    )
    batch = []
    for i, n in enumerate(num_boxes):
        image = torch.rand(3, size, size, generator=gen) * 255
        inst = Instances((size, size))
        boxes = all_boxes[i : i + n] if n else torch.zeros(0, 4)
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.arange(i, i + n, dtype=torch.long) % NUM_CLASSES
        batch.append({"image": image, "instances": inst, "height": size, "width": size})
    return batch


def train_losses(model, batch):
    model.train()
    with EventStorage():
        return model(batch)


def assert_finite_losses(losses):
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), (name, value)


# ---------------------------------------------------------------- switches off = parent
@pytest.mark.parametrize("arch", sorted(DETECTORS))
def test_switches_off_equal_parent(arch):
    parent = small_model(arch, hqod=False)
    hqod = small_model(arch, hqod=True, tcorr=False, hiou=False)
    assert isinstance(hqod, type(parent))
    for (k1, v1), (k2, v2) in zip(parent.state_dict().items(), hqod.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)

    batches = [make_batch((2, 1)), make_batch((2, 1))]  # twice: the EMA normalizers evolve alike
    if arch != "fcos" or _FCOS_HANDLES_EMPTY_IMAGES:  # detectron2 v0.6 FCOS crashes on (2, 0)
        batches.append(make_batch((2, 0)))
    for batch in batches:
        expected, actual = train_losses(parent, batch), train_losses(hqod, batch)
        assert expected.keys() == actual.keys()
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)

    batch = batches[0]

    parent.eval()
    hqod.eval()
    with torch.no_grad():
        expected, actual = parent(batch), hqod(batch)
    for e, a in zip(expected, actual):
        e, a = e["instances"], a["instances"]
        assert len(e) > 0
        torch.testing.assert_close(a.pred_boxes.tensor, e.pred_boxes.tensor, rtol=0, atol=0)
        torch.testing.assert_close(a.scores, e.scores, rtol=0, atol=0)
        assert torch.equal(a.pred_classes, e.pred_classes)


# ---------------------------------------------------------------- HQOD terms
@pytest.mark.parametrize("arch", sorted(DETECTORS))
def test_hqod_losses_present_finite_and_differentiable(arch):
    model = small_model(arch, hqod=True)
    losses = train_losses(model, make_batch((2, 1)))
    assert {"loss_tcorr", "loss_hiou"} <= losses.keys()
    assert_finite_losses(losses)
    assert losses["loss_tcorr"] > 0 and losses["loss_hiou"] > 0

    head = model.head
    cls_w, box_w = head.cls_score.weight, head.bbox_pred.weight
    # TCorr: p and u are not detached -> gradients reach both the class and the box predictor.
    g_cls, g_box = torch.autograd.grad(losses["loss_tcorr"], [cls_w, box_w], retain_graph=True)
    assert g_cls.abs().sum() > 0 and g_box.abs().sum() > 0
    assert torch.isfinite(g_cls).all() and torch.isfinite(g_box).all()
    # HIoU depends on u only.
    g_cls, g_box = torch.autograd.grad(
        losses["loss_hiou"], [cls_w, box_w], retain_graph=True, allow_unused=True
    )
    assert (g_cls is None or g_cls.abs().sum() == 0) and g_box.abs().sum() > 0

    one = small_model(arch, hqod=True, hiou=False)
    assert "loss_hiou" not in train_losses(one, make_batch((2, 1)))
    one = small_model(arch, hqod=True, tcorr=False)
    assert "loss_tcorr" not in train_losses(one, make_batch((2, 1)))


def _positives(model, batch, num_outputs):
    """(p, u, gt_labels, pos_mask, anchors, gt_boxes) recomputed from the model's own pieces."""
    with torch.no_grad():
        images = model.preprocess_image(batch)
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        preds = model._transpose_dense_predictions(
            model.head(features), [NUM_CLASSES, 4, 1][:num_outputs]
        )
        anchors = model.anchor_generator(features)
        gt_labels, gt_boxes = model.label_anchors(anchors, [x["instances"] for x in batch])
        gt_labels, gt_boxes = torch.stack(gt_labels), stack_boxes(gt_boxes)
        pos = (gt_labels >= 0) & (gt_labels != NUM_CLASSES)
        logits = torch.cat(preds[0], 1)[pos]
        p = logits.sigmoid()[torch.arange(len(logits)), gt_labels[pos]]
        anchor_t = Boxes.cat(anchors).tensor.expand(len(batch), -1, -1)[pos]
        boxes = model.box2box_transform.apply_deltas(torch.cat(preds[1], 1)[pos], anchor_t)
        from torchvision.ops import box_iou

        u = box_iou(boxes, gt_boxes[pos]).diagonal()
    return p, u, anchor_t, gt_boxes[pos]


@pytest.mark.parametrize("arch", sorted(DETECTORS))
def test_hqod_normalizer(arch):
    """Eq. 9 terms = sum over positives / the detector's box-loss normalizer."""
    model = small_model(arch, hqod=True, sigma=1.5, gamma=0.8)
    batch = make_batch((2, 1))
    losses = train_losses(model, batch)
    model.train()  # BN batch statistics, as in the forward above
    p, u, anchors, gt = _positives(model, batch, 2 if arch == "retinanet" else 3)
    assert len(p) > 0
    if arch == "atss":
        # ATSS: centerness-target sum (HQOD terms themselves not weighted by centerness)
        normalizer = max(ATSS.compute_ctrness_targets(anchors, gt).sum().item(), 1.0)
        assert normalizer == pytest.approx(model.box_loss_normalizer)
    else:
        # RetinaNet and FCOS: the EMA of the number of positives after this step
        initial = 100 if arch == "retinanet" else 300
        normalizer = 0.9 * initial + 0.1 * len(p)
        assert normalizer == pytest.approx(model.loss_normalizer)
    eps = 1e-6  # hqod.losses.TCORR_EPS: matters where u is exactly 0 (FCOS at init: c = eps**p)
    c = (p + eps) ** u * (u + eps) ** p
    tcorr = ((1 + (p - u).abs()) * (torch.exp(-c) - math.exp(-1))).sum() / normalizer
    hiou = (1.5 * (1 + u) ** 0.8 * (1 - u)).sum() / normalizer
    assert losses["loss_tcorr"].item() == pytest.approx(tcorr.item(), rel=1e-4)
    assert losses["loss_hiou"].item() == pytest.approx(hiou.item(), rel=1e-4)


# ---------------------------------------------------------------- images without instances
@pytest.mark.parametrize("arch", sorted(DETECTORS))
@pytest.mark.parametrize("switches", [True, False])
def test_images_without_instances(arch, switches):
    model = small_model(arch, hqod=True, tcorr=switches, hiou=switches)
    for num_boxes in [(2, 0), (0, 0)]:
        losses = train_losses(model, make_batch(num_boxes))
        assert_finite_losses(losses)
        if switches:
            assert {"loss_tcorr", "loss_hiou"} <= losses.keys()
        total = sum(losses.values())
        model.zero_grad()
        total.backward()
        for name, param in model.named_parameters():
            assert param.grad is None or torch.isfinite(param.grad).all(), name


def test_hqod_fcos_labels_of_mixed_batch_match_fcos():
    """The FCOS image-without-instances fix leaves the labels of the other images unchanged."""
    model = small_model("fcos", hqod=True)
    batch = make_batch((2, 0, 1))
    anchors = model.anchor_generator(
        [torch.zeros(1, 1, 128 // s, 128 // s) for s in (8, 16, 32, 64, 128)]
    )
    instances = [x["instances"] for x in batch]
    labels, boxes = model.label_anchors(anchors, instances)
    ref_labels, ref_boxes = FCOS.label_anchors(model, anchors, [instances[0], instances[2]])
    assert torch.equal(labels[0], ref_labels[0]) and torch.equal(labels[2], ref_labels[1])
    assert (labels[1] == NUM_CLASSES).all()
    assert torch.equal(stack_boxes(boxes)[[0, 2]], stack_boxes(ref_boxes))
    assert type(boxes[1]) is type(boxes[0])  # Boxes on detectron2 v0.6, tensors on main
    mixed = stack_boxes([torch.ones(2, 4), Boxes(torch.ones(2, 4))])
    assert torch.equal(mixed, torch.ones(2, 2, 4))


# ---------------------------------------------------------------- ATSS assignment
def _hand_anchors():
    # level 0 (10x10): centers (5,5), (15,5), (25,5), (35,5) -> anchors 0..3
    level0 = [[cx - 5.0, 0.0, cx + 5.0, 10.0] for cx in (5, 15, 25, 35)]
    # level 1 (20x20): centers (10,10), (30,10) -> anchors 4, 5
    level1 = [[cx - 10.0, 0.0, cx + 10.0, 20.0] for cx in (10, 30)]
    return [Boxes(torch.tensor(level0)), Boxes(torch.tensor(level1))]


# Hand computation, topk = 2 (both level-1 anchors are always candidates):
# GT0 [9,0,20,10], center (14.5,5): level-0 distances 9.5, 0.5, 10.5, 20.5 -> candidates 1, 0
#   IoUs: a1 100/110 = .9091, a0 10/200 = .05, a4 110/400 = .275, a5 0
#   mean .3085, std (unbiased) .4179 -> threshold .7264: a1 (center (15,5) inside GT0)
# GT1 [10,0,20.5,10], center (15.25,5): distances 10.25, 0.25, 9.75, 19.75 -> candidates 1, 2
#   IoUs: a1 100/105 = .9524, a2 5/200 = .025, a4 100/405 = .2469, a5 5/500 = .01
#   mean .3086, std .4427 -> threshold .7512: a1 (center inside GT1)
#   a1 is positive for GT0 (.9091) and GT1 (.9524): it goes to GT1, GT0 keeps no anchor.
# GT2 [20,0,40,20] (= a5), center (30,10): distances 25.5, 15.8, 7.07, 7.07 -> candidates 2, 3
#   IoUs: a2 .25, a3 .25, a4 0, a5 1 -> mean .375, std .4330, threshold .8080: a5
# GT3 [12,11,19,19], center (15.5,15): distances 14.5, 10.01, 13.79, 21.9 -> candidates 1, 2
#   IoUs: a1 0, a2 0, a4 56/400 = .14, a5 0 -> mean .035, std .07, threshold .105: a4 passes
#   the threshold but its center (10,10) is outside GT3 (x < 12): no positive.
HAND_GT = [
    [9.0, 0.0, 20.0, 10.0],
    [10.0, 0.0, 20.5, 10.0],
    [20.0, 0.0, 40.0, 20.0],
    [12.0, 11.0, 19.0, 19.0],
]


def test_atss_match_hand_example():
    anchors, gt = _hand_anchors(), Boxes(torch.tensor(HAND_GT))
    assert atss_match(anchors, gt, topk=2).tolist() == [-1, 1, -1, -1, -1, 2]
    # without the "center inside the GT" rule, a4 would be a positive of GT3
    assert atss_match(anchors, gt, topk=2, min_inside_dist=-1e9).tolist() == [-1, 1, -1, -1, 3, 2]
    # GT0 alone keeps a1
    assert atss_match(anchors, gt[[0]], topk=2).tolist() == [-1, 0, -1, -1, -1, -1]
    # no ground truth: all background
    assert atss_match(anchors, gt[[]], topk=2).tolist() == [-1] * 6


def test_atss_label_anchors_hand_example():
    model = small_model("atss", hqod=False, topk=2)
    inst = Instances((40, 40))
    inst.gt_boxes = Boxes(torch.tensor(HAND_GT))
    inst.gt_classes = torch.tensor([0, 1, 2, 0])
    empty = Instances((40, 40), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0).long())
    labels, boxes = model.label_anchors(_hand_anchors(), [inst, empty])
    bg = NUM_CLASSES
    assert labels[0].tolist() == [bg, 1, bg, bg, bg, 2]
    assert boxes[0][1].tolist() == HAND_GT[1] and boxes[0][5].tolist() == HAND_GT[2]
    assert labels[1].tolist() == [bg] * 6 and boxes[1].abs().sum() == 0
    # centerness target of a1 in GT1: l, r = 5, 5.5; t, b = 5, 5 -> sqrt(5 / 5.5)
    ctr = ATSS.compute_ctrness_targets(_hand_anchors()[0].tensor[[1]], boxes[0][[1]])
    assert ctr.item() == pytest.approx(math.sqrt(5 / 5.5))


# ---------------------------------------------------------------- training and configs
def test_hqod_retinanet_loss_falls_with_sgd():
    # All four RetinaNet/HQOD losses share the EMA normalizer, which drifts from its initial 100
    # towards the number of positives: compare the un-normalized sums.
    totals, losses = sgd_totals(small_model("retinanet", hqod=True), make_batch((2, 1), size=96), steps=10, lr=0.01, normalized=False)
    assert all(math.isfinite(t) for t in totals)
    assert totals[-1] < 0.75 * totals[0], totals
    assert {"loss_tcorr", "loss_hiou"} <= losses.keys()


def test_atss_fp32_config_instantiates_and_runs():
    cfg = LazyConfig.load(str(ROOT / "configs" / "atss_r18_fp32.py"))
    model = instantiate(cfg.model)
    assert isinstance(model, ATSS) and model.num_classes == 10
    head = model.head
    assert [n for n in ("cls_score", "bbox_pred", "ctrness") if hasattr(head, n)] == [
        "cls_score",
        "bbox_pred",
        "ctrness",
    ]
    assert head.ctrness.out_channels == 1 and head.cls_score.out_channels == 10
    batch = make_batch((2, 1), size=128)
    assert_finite_losses(train_losses(model, batch))
    model.eval()
    model.test_score_thresh = 0.005
    with torch.no_grad():
        out = model(batch)
    inst = out[0]["instances"]
    assert len(inst) > 0 and inst.pred_classes.max() < 10
    assert (inst.scores <= 1).all() and (inst.scores[:-1] >= inst.scores[1:]).all()


def test_registered_and_yacs_from_config():
    for name in ("HQODRetinaNet", "ATSS", "HQODATSS"):
        assert META_ARCH_REGISTRY.get(name) is not None
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "HQODATSS"
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.RETINANET.NUM_CONVS = 1
    cfg.MODEL.RETINANET.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[64], [128], [256], [512], [1024]]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[1.0]]
    cfg.MODEL.RETINANET.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
    cfg.MODEL.HQOD = type(cfg)({"TCORR": False, "SIGMA": 2.0})
    model = build_model(cfg)
    assert isinstance(model, HQODATSS) and model.head.ctrness.out_channels == 1
    assert (model.tcorr, model.hiou, model.sigma, model.gamma) == (False, True, 2.0, 0.8)
    cfg.MODEL.META_ARCHITECTURE = "HQODRetinaNet"
    model = build_model(cfg)
    assert isinstance(model, HQODRetinaNet) and not model.tcorr and model.sigma == 2.0


def test_hqod_variant_comes_from_the_classes():
    """with_hqod's lookup: each detector's HQOD subclass, found from the class definitions alone
    (a new one needs no list edited); a detector without one is named with those that have one."""
    from hqod.modeling import FCOS as HQODsFCOS
    from hqod.modeling import hqod_variant
    from hqod.modeling.meta_arch.hqod_mixin import HQODLossMixin

    assert hqod_variant(RetinaNet) is HQODRetinaNet
    assert hqod_variant(HQODsFCOS) is HQODFCOS and hqod_variant(ATSS) is HQODATSS

    class ToyDetector(RetinaNet):
        pass

    class HQODToyDetector(HQODLossMixin, ToyDetector):
        pass

    assert hqod_variant(ToyDetector) is HQODToyDetector
    with pytest.raises(ValueError) as e:
        hqod_variant(FCOS)  # detectron2's own FCOS: the configs use hqod's
    assert str(e.value).startswith("detectron2.modeling.meta_arch.fcos.FCOS has no HQOD variant; the detectors with one: ")
    assert "hqod.modeling.meta_arch.fcos.FCOS" in str(e.value) and "detectron2.modeling.meta_arch.retinanet.RetinaNet" in str(e.value)


def test_hardet_on_retinanet_positive_losses_and_terms():
    """HarDet* on RetinaNet: the per-positive losses sum to RetinaNet's own (box loss, and the
    positives' part of the focal loss), and the HarDet terms are those of hqod.losses on them."""
    from fvcore.nn import sigmoid_focal_loss

    from hqod.losses import hardet_losses

    model = small_model("retinanet", hqod=True, harmony="hardet")
    batch = make_batch()
    losses = train_losses(model, batch)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_hardet_cls", "loss_hardet_reg"}
    assert_finite_losses(losses)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.head.parameters() if p.requires_grad)

    model.zero_grad()
    with torch.no_grad(), EventStorage():
        images = model.preprocess_image(batch)
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        logits, deltas = model._transpose_dense_predictions(model.head(features), [NUM_CLASSES, 4])
        anchors = model.anchor_generator(features)
        gt_labels, gt_boxes = model.label_anchors(anchors, [x["instances"] for x in batch])
        own = RetinaNet.losses(model, anchors, logits, gt_labels, deltas, gt_boxes)
        normalizer = model.loss_normalizer
        l_cls, l_reg, scores = model.positive_losses(anchors, logits, gt_labels, deltas, gt_boxes)
        p, u = model.harmony_pairs(anchors, logits, gt_labels, deltas, gt_boxes)
        labels = torch.stack(gt_labels)
        negatives = labels == NUM_CLASSES
        neg_focal = sigmoid_focal_loss(
            torch.cat(logits, 1)[negatives], torch.zeros_like(torch.cat(logits, 1)[negatives]),
            alpha=0.25, gamma=2.0, reduction="sum",
        )
        assert len(l_cls) == len(l_reg) == len(p) == int(((labels >= 0) & ~negatives).sum()) > 0
        assert float(l_reg.sum() / normalizer) == pytest.approx(float(own["loss_box_reg"]), rel=1e-5)
        assert float((l_cls.sum() + neg_focal) / normalizer) == pytest.approx(float(own["loss_cls"]), rel=1e-5)
        assert torch.allclose(scores.gather(1, labels[(labels >= 0) & ~negatives][:, None]).squeeze(1), p)
        again = model.losses(anchors, logits, gt_labels, deltas, gt_boxes)  # moves the EMA normalizer
        terms = hardet_losses(l_cls, l_reg, p, u, scores, model.loss_normalizer)
    for key in ("loss_hardet_cls", "loss_hardet_reg"):
        assert float(again[key]) == pytest.approx(float(terms[key]), rel=1e-6)


def test_hardet_needs_per_positive_losses():
    with pytest.raises(ValueError, match="HQODFCOS has no per-positive losses for HarDet"):
        small_model("fcos", hqod=True, harmony="hardet")
    with pytest.raises(ValueError, match=r"model.harmony must be one of \['hqod', 'hardet'\]; got 'harmdet'"):
        small_model("retinanet", hqod=True, harmony="harmdet")
