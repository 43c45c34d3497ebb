"""
AQD's integer pipeline (issue 4): F(m, n) = c / 2^d against brute force; the integer-aware BN and
skip-add of scope "aqd" against AQD Eq. 5-8 written out here; the integer-only engine against the
fake-quant model of a small trained RetinaNet (and calibrated FCOS / ATSS) — head outputs within
one output step, the same detections after NMS, the same COCO AP; saving and loading; refusal of
models that are not fully quantized; tools/export_integer.py.
"""
import copy
import itertools
import os
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import LazyConfig, instantiate
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling.backbone.resnet import BasicBlock
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.utils.events import EventStorage

from hqod.engine import build_model
from hqod.quantization import (
    IntegerConversionError,
    MultiLevelBatchNorm,
    QBasicBlock,
    align_add,
    calibrate,
    compare_integer_model,
    integer_summary,
    load_integer_model,
    quantize_model,
    save_integer_model,
    set_fake_quant,
    set_integer_aware,
    shift_approx,
    to_integer,
)
from hqod.quantization import functional
from hqod.quantization.integer_layers import INT32_MAX, add_max_shift, integer_batch_norm

from helpers import ROOT, calibrated_detector, load_tool, synthetic_batches, tiny_config
AQD = {"method": "lq", "scope": "aqd", "weight_bits": 4, "act_bits": 4}


@pytest.fixture(autouse=True)
def default_kernels():
    previous = functional.get_backend()
    functional.set_backend("auto")
    yield
    functional.set_backend(previous)


# ------------------------------------------------------------------------------------------
# Eq. 8: F(m, n) = c / 2^d
# ------------------------------------------------------------------------------------------
def brute_force_f(m: Fraction, n: Fraction, max_shift: int):
    """Every (c, d) with c <= m/n * 2^d + 2 (the best c is below), smallest error, then
    smallest d, then smallest c — vectorized with exact integer arithmetic (m, n small ints)."""
    p, q = m.numerator * n.denominator, m.denominator * n.numerator
    best = None
    for d in range(1, max_shift + 1):
        c = np.arange(0, p * 2**d // q + 3, dtype=np.int64)
        err = np.abs(p * 2**d - c * q) * 2 ** (max_shift - d)  # over q * 2^max_shift
        i = int(np.argmin(err))  # first minimum: the smallest c
        cand = (int(err[i]), d, int(c[i]))
        if best is None or cand < best:
            best = cand
    return best[2], best[1]


def test_shift_approx_matches_brute_force():
    rng = random.Random(0)
    ratios = {(3, 2), (1, 1), (5, 4), (7, 3), (255, 17), (16, 1), (1000, 999)}
    while len(ratios) < 400:
        n = rng.randint(1, 300)
        ratios.add((rng.randint(n, 12 * n), n))
    for (m, n), max_shift in itertools.product(sorted(ratios), (1, 2, 5, 9)):
        assert shift_approx(m, n, max_shift) == brute_force_f(Fraction(m), Fraction(n), max_shift), (m, n, max_shift)
    # floats (quantizer scales) are exact rationals: the result is the exact argmin
    for _ in range(200):
        a, b = rng.uniform(1e-4, 1.0), rng.uniform(1e-4, 1.0)
        m, n = max(a, b), min(a, b)
        c, d = shift_approx(m, n, 31)
        r = Fraction(m) / Fraction(n)
        assert abs(r - Fraction(c, 2**d)) <= Fraction(1, 2**32)
        assert c % 2 == 1 or d == 1  # lowest terms (smallest d among the minimizers)
        best = min(abs(r - Fraction(round(r * 2**31 + k), 2**31)) for k in (-1, 0, 1))
        assert abs(r - Fraction(c, 2**d)) == best


def test_shift_approx_ties_and_errors():
    assert shift_approx(3, 2) == (3, 1)  # exact: in lowest terms
    assert shift_approx(1, 1) == (2, 1)  # d >= 1
    assert shift_approx(5, 4, max_shift=1) == (2, 1)  # 1 and 3/2 tie: the smaller c
    assert shift_approx(Fraction(11, 8), 1, max_shift=2) == (3, 1)  # 5/4, 3/2 tie: 3/2 has d = 1
    with pytest.raises(ValueError, match="m >= n"):
        shift_approx(1, 2)
    with pytest.raises(ValueError, match="n must be > 0"):
        shift_approx(1, 0)
    with pytest.raises(ValueError, match="max_shift"):
        shift_approx(2, 1, max_shift=0)


@pytest.mark.parametrize("a1, a2, m1, m2", [(0.1, 0.37, 15, 15), (0.5, 0.02, 255, 15), (0.3, 0.3, 3, 3)])
def test_add_alignment_is_int32_safe_and_largest(a1, a2, m1, m2):
    al = align_add(a1, a2, m1, m2)
    small, large = (m1, m2) if al.rescaled == 2 else (m2, m1)
    assert small * 2**al.d + large * al.c <= INT32_MAX
    r = Fraction(max(a1, a2)) / Fraction(min(a1, a2))
    d_max = add_max_shift(r, small, large)
    assert small * 2 ** (d_max + 1) + large * (r * 2 ** (d_max + 1) + Fraction(1, 2)) > INT32_MAX or d_max == 31
    assert (al.c, al.d) == shift_approx(max(a1, a2), min(a1, a2), d_max)
    assert al.rescaled == (2 if a2 >= a1 else 1)


def _round_half_even(x: Fraction) -> int:
    fl = x.numerator // x.denominator
    rem = x - fl
    return fl + (rem > Fraction(1, 2) or (rem == Fraction(1, 2) and fl % 2 == 1))


@pytest.mark.parametrize("offset2", [0, 15, 255])
def test_requantization_is_exact_integer_arithmetic(offset2):
    """IntRequant: clip(round_half_even(q * M / 2^k + offset)) with integer ops only, exactly;
    ties (ratio 1/2, 3/4: exact) go to even as torch.round does."""
    from hqod.quantization.integer import IntRequant
    from hqod.quantization.integer_layers import IntegerGrid

    eta_max = max(offset2, 15)
    grid = IntegerGrid(step=1.0, eta_min=0, eta_max=eta_max, offset2=offset2)
    ratios = [0.5, 0.75, -0.5, 0.013207496698530717, -2.3e-5, 3.7, 1e-9]
    q = torch.arange(-3000, 3001, dtype=torch.int64).view(1, 1, -1, 1).expand(1, len(ratios), -1, 1).contiguous()
    req = IntRequant(ratios, grid, max_abs_input=3000)
    out = req(q.clone())
    for c, r in enumerate(ratios):
        M, k = int(req.multiplier[c]), int(req.shift[c])
        # relative error <= 2^-29, or (a tiny ratio next to a large offset, which bounds k) an
        # absolute error below 2^-24 output steps for every input
        err = abs(Fraction(M, 2**k) - Fraction(r))
        assert err <= abs(Fraction(r)) / 2**29 or err * 3000 <= Fraction(1, 2**24), r
        for qi in (-3000, -7, -1, 0, 1, 2, 3, 5, 999, 3000):
            eta = min(max(_round_half_even(qi * Fraction(M, 2**k) + Fraction(offset2, 2)), 0), eta_max)
            assert int(out[0, c, qi + 3000, 0]) == grid.m * eta - grid.q_offset, (r, qi)
        if r in (0.5, 0.75, -0.5):  # exact ratios: the same as the fake quantizer's float rounding
            ref = torch.clamp(torch.round(q[0, c].double() * r + offset2 / 2), 0, eta_max) * grid.m - grid.q_offset
            assert torch.equal(out[0, c], ref.long())


# ------------------------------------------------------------------------------------------
# Eq. 5-6: integer BN
# ------------------------------------------------------------------------------------------
def grid_int(x, quantizer):
    """The integers q of a fake-quantized tensor (x_hat = q * scale)."""
    g = quantizer.integer_grid()
    q = x / g.scale
    assert torch.allclose(q, q.round(), atol=1e-6)
    return q.round(), g.scale


def random_bn(bn, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(bn.num_features, generator=g))  # some negative gammas
        bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.2)


def quantized_conv_bn(seed=0):
    torch.manual_seed(seed)
    holder = nn.Sequential(Conv2d(8, 16, 3, padding=1, bias=False, norm=nn.BatchNorm2d(16)))
    random_bn(holder[0].norm, seed)
    quantize_model(holder, dict(AQD))
    x = torch.randn(2, 8, 12, 12)
    calibrate(holder, [x], num_images=2)
    return holder.double(), x.double()


def eq6_reference(conv, x, mean, var):
    """AQD Eq. 4-6 written out: eta_conv from the integer grids, s, round(s), alpha_z."""
    bn = conv.norm
    qx, ax = grid_int(conv.input_quant(x), conv.input_quant)
    qw, aw = grid_int(conv.weight_quant(conv.weight), conv.weight_quant)
    eta_conv = F.conv2d(qx, qw, padding=1)  # Eq. 4: integers
    alpha_conv = ax * aw
    sigma = torch.sqrt(var + bn.eps)
    s = (bn.bias * sigma / bn.weight - mean) / alpha_conv  # Eq. 5
    alpha_z = alpha_conv * bn.weight / sigma
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    return (eta_conv + v(torch.round(s))) * v(alpha_z), eta_conv, alpha_conv, alpha_z  # Eq. 6


def test_integer_bn_eval_is_eq6():
    holder, x = quantized_conv_bn(0)
    holder.eval()
    conv = holder[0]
    z_bar, eta_conv, alpha_conv, alpha_z = eq6_reference(conv, x, conv.norm.running_mean, conv.norm.running_var)
    with torch.no_grad():
        out = holder(x)
        torch.testing.assert_close(out, conv.norm.output_quant(z_bar), rtol=0, atol=1e-12)
        # the rounding moves each channel by at most half a step of its scale
        z_float = F.batch_norm(eta_conv * alpha_conv, conv.norm.running_mean, conv.norm.running_var,
                               conv.norm.weight, conv.norm.bias, False, 0.0, conv.norm.eps)
        assert ((z_bar - z_float).abs() <= 0.5 * alpha_z.abs().view(1, -1, 1, 1) + 1e-12).all()
        assert not torch.allclose(z_bar, z_float)
    # the integer engine's parameters are the same numbers
    assert conv.accumulator_step() == pytest.approx(alpha_conv, rel=1e-15)


def test_integer_bn_is_eq6_with_per_channel_weights():
    """quant.weight_granularity='channel': alpha_conv = alpha_x * alpha_w[c] per output channel
    (Eq. 4), and the BN shift is rounded in those units (Eq. 5-6), written out."""
    torch.manual_seed(0)
    holder = nn.Sequential(Conv2d(8, 16, 3, padding=1, bias=False, norm=nn.BatchNorm2d(16)))
    random_bn(holder[0].norm, 0)
    quantize_model(holder, dict(AQD, weight_granularity="channel"))
    x = torch.randn(2, 8, 12, 12)
    calibrate(holder, [x], num_images=2)
    holder.double().eval()
    x = x.double()
    conv, bn = holder[0], holder[0].norm
    qx, ax = grid_int(conv.input_quant(x), conv.input_quant)
    aw = conv.weight_quant.integer_grid().scale
    assert aw.shape == (16,) and aw.unique().numel() == 16
    qw = conv.weight_quant(conv.weight) / aw.view(-1, 1, 1, 1)
    assert torch.allclose(qw, qw.round(), atol=1e-6)
    eta_conv = F.conv2d(qx, qw.round(), padding=1)  # Eq. 4: integers
    alpha_conv = ax * aw  # one accumulator step per output channel
    sigma = torch.sqrt(bn.running_var + bn.eps)
    s = (bn.bias * sigma / bn.weight - bn.running_mean) / alpha_conv  # Eq. 5
    alpha_z = alpha_conv * bn.weight / sigma
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    z_bar = (eta_conv + v(torch.round(s))) * v(alpha_z)  # Eq. 6
    with torch.no_grad():
        torch.testing.assert_close(holder(x), bn.output_quant(z_bar), rtol=0, atol=1e-12)
    torch.testing.assert_close(conv.accumulator_step(), alpha_conv, rtol=1e-15, atol=0)


def test_integer_bn_training_is_eq6_with_batch_stats_and_ste_gradients():
    holder, x = quantized_conv_bn(1)
    conv = holder[0]
    conv.train()
    plain = copy.deepcopy(conv.norm)
    alpha_conv = conv.accumulator_step()
    y = conv._conv_forward(conv.input_quant(x), conv.quantized_weight(), None).detach().requires_grad_(True)
    var, mean = torch.var_mean(y.detach(), dim=(0, 2, 3), unbiased=False)
    z_bar, _, _, alpha_z = eq6_reference(conv, x, mean, var)
    z = integer_batch_norm(conv.norm, y, alpha_conv)
    torch.testing.assert_close(z, z_bar, rtol=0, atol=1e-12)
    # running statistics as torch's BN updates them; gradients of the float BN (straight-through)
    y2 = y.detach().clone().requires_grad_(True)
    nn.BatchNorm2d.forward(plain, y2)  # plain is a QBatchNorm2d copy: its float BN forward
    torch.testing.assert_close(conv.norm.running_mean, plain.running_mean)
    torch.testing.assert_close(conv.norm.running_var, plain.running_var)
    assert int(conv.norm.num_batches_tracked) == int(plain.num_batches_tracked)
    g = torch.randn_like(z)
    z.backward(g)
    ref = F.batch_norm(y2, None, None, plain.weight, plain.bias, True, 0.0, plain.eps)
    ref.backward(g)
    torch.testing.assert_close(y.grad, y2.grad)
    torch.testing.assert_close(conv.norm.weight.grad, plain.weight.grad)
    torch.testing.assert_close(conv.norm.bias.grad, plain.bias.grad)


def test_multi_level_bn_is_eq6_per_level():
    """The head's towers: level l's BN, with the accumulator step of the conv before it."""
    head = RetinaNetHead(input_shape=[ShapeSpec(channels=8)] * 3, num_classes=2, num_anchors=1,
                         conv_dims=[8, 8], norm="BN")
    holder = DenseDetector(nn.Identity(), head, ["p3", "p4", "p5"], pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3)
    quantize_model(holder, dict(AQD))  # a head is quantized with its detector (its levels)
    mlbn = holder.head.cls_subnet[1]
    assert isinstance(mlbn, MultiLevelBatchNorm) and mlbn.output_quant is not None
    for level, bn in enumerate(mlbn.levels):
        random_bn(bn, 10 + level)
    feats = [torch.randn(2, 8, s, s) for s in (8, 4, 2)]
    calibrate(holder.head, [feats], num_images=2)
    holder.double().eval()
    feats = [f.double() for f in feats]
    conv = holder.head.cls_subnet[0]
    for level in (2, 0, 1):
        qx, ax = grid_int(conv.input_quant(feats[level]), conv.input_quant)
        qw, aw = grid_int(conv.weight_quant(conv.weight), conv.weight_quant)
        alpha_conv = ax * aw
        eta = F.conv2d(qx, qw, padding=1) + torch.round(conv.bias / alpha_conv).view(1, -1, 1, 1)
        bn = mlbn.levels[level]
        sigma = torch.sqrt(bn.running_var + bn.eps)
        s = torch.round((bn.bias * sigma / bn.weight - bn.running_mean) / alpha_conv)
        z_bar = (eta + s.view(1, -1, 1, 1)) * (alpha_conv * bn.weight / sigma).view(1, -1, 1, 1)
        with torch.no_grad():
            out = holder.head.cls_subnet[:2](feats[level], level)
        torch.testing.assert_close(out, mlbn.output_quant(z_bar), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Eq. 7-8: skip-add
# ------------------------------------------------------------------------------------------
def eq7_reference(x1, q1, x2, q2):
    """AQD Eq. 7 written out (the int32-safe shift as align_add picks it)."""
    e1, a1 = grid_int(x1, q1)
    e2, a2 = grid_int(x2, q2)
    m1, m2 = q1.integer_grid().max_abs, q2.integer_grid().max_abs
    if a2 >= a1:
        c, d = shift_approx(a2, a1, add_max_shift(Fraction(a2) / Fraction(a1), m1, m2))
        return (e1 + e2 * c / 2**d) * a1, 2
    c, d = shift_approx(a1, a2, add_max_shift(Fraction(a1) / Fraction(a2), m2, m1))
    return (e1 * c / 2**d + e2) * a2, 1


@pytest.mark.parametrize("shortcut", ["identity", "conv"])
@pytest.mark.parametrize("larger", [1, 2])
def test_skip_add_is_eq7(shortcut, larger):
    torch.manual_seed(3)
    cin = 8 if shortcut == "identity" else 4
    block = BasicBlock(cin, 8, stride=1, norm="BN")
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            random_bn(m, 5)
    holder = nn.Sequential(block)
    quantize_model(holder, dict(AQD))
    block = holder[0]
    assert isinstance(block, QBasicBlock) and (block.shortcut is None) == (shortcut == "identity")
    raw = torch.randn(2, cin, 10, 10)
    x = torch.relu(raw)
    in_quant = None
    if shortcut == "identity":  # the block's input lies on the previous add's grid
        from hqod.quantization import QUANTIZERS

        in_quant = QUANTIZERS.get("lq")(bits=4, signed=True)
        x = torch.relu(in_quant(raw))
    calibrate(holder, [x], num_images=2)
    holder.double().eval()
    q1 = block.conv2.norm.output_quant
    q2 = in_quant.double() if in_quant is not None else block.shortcut.norm.output_quant
    with torch.no_grad():  # make the wanted input's integer scale 2.6x the other's
        big, small = (q1, q2) if larger == 1 else (q2, q1)
        big.interval.fill_(2.6 * small.integer_grid().scale * big.integer_grid().m / big._step_per_nu)
        x = torch.relu(in_quant(raw.double())) if in_quant is not None else x.double()
        out = block.conv2(F.relu(block.conv1(x)))
        sc = block.shortcut(x) if block.shortcut is not None else x
        y_bar, rescaled = eq7_reference(out, q1, sc, q2)
        assert rescaled == (2 if larger == 2 else 1)
        # the block is told its input's quantizer (QResNet.forward does)
        torch.testing.assert_close(block(x, in_quant), F.relu(block.add_quant(y_bar)), rtol=0, atol=1e-12)
        # close to the float sum: the alignment error of F is tiny
        assert (y_bar - (out + sc)).abs().max() < 1e-6 * (out + sc).abs().max()


# ------------------------------------------------------------------------------------------
# The integer-only engine
# ------------------------------------------------------------------------------------------
def tiny_aqd_config(config="configs/retina_r18_aqd_w4.py"):
    cfg = tiny_config(config)
    cfg.model.test_score_thresh = 0.0  # every candidate: NMS and the top-100 cut are exercised
    return cfg


@pytest.fixture(scope="module")
def trained_aqd(tiny_digits, tmp_path_factory):
    """RetinaNet-R18 AQD W4A4 (FPN/head width 32): BN statistics from a few float forwards,
    calibration on 8 images, then 3 QAT steps on the tiny dataset; saved as a checkpoint."""
    torch.manual_seed(0)
    cfg = tiny_aqd_config()
    # the same training images whatever ran before (else the stream seed comes from the global
    # RNG and the float32 AP check below flips with the tests that ran first); stream 3 because
    # streams 0-2 leave a detector at AP <= 0.013, which would make the AP checks vacuous
    cfg.dataloader.train.seed = 3
    # BN outputs and adds at 4 bits (AQD's stricter scheme): with the default 8 this 3-step
    # detector scores AP 0.000 and its near-tied scores make the checks below vacuous; the
    # default is converted and checked in test_integer_engine_fcos_atss_w2
    cfg.quant.output_bits = 4
    model = build_model(cfg)
    loader = iter(instantiate(cfg.dataloader.train))
    set_fake_quant(model, False)
    model.train()
    with torch.no_grad(), EventStorage():
        for _ in range(3):
            model(next(loader))
    set_fake_quant(model, True)
    calibrate(model, loader, num_images=8)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    with EventStorage():
        for _ in range(3):
            loss = sum(model(next(loader)).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    path = str(tmp_path_factory.mktemp("aqd") / "model_final.pth")
    torch.save({"model": model.state_dict()}, path)
    return cfg, model, path


def test_integer_engine_matches_fake_quant(trained_aqd, tmp_path):
    cfg, model, _ = trained_aqd
    before = {k: v.clone() for k, v in model.state_dict().items()}
    int_model = to_integer(model)
    assert type(int_model) is type(model) and model.backbone.__class__.__name__ == "QFPN"
    # the quantized FPN and ResNet themselves (their structure and forward), on integer units;
    # the fake-quant model is left as it was
    backbone = int_model.backbone
    assert type(backbone).__name__ == "IntegerFPN" and type(backbone.bottom_up).__name__ == "IntegerResNet"
    assert [type(m).__name__ for m in backbone.lateral_convs + backbone.output_convs] == ["IntConvUnit"] * 6
    assert backbone.lateral_convs[0] is backbone.fpn_lateral5 and backbone.bottom_up.stages[0] is backbone.bottom_up.res2
    assert {type(m).__name__ for m in model.backbone.lateral_convs + [model.backbone.bottom_up.res2[0]]} == {"QConv2d", "QBasicBlock"}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    summary = integer_summary(int_model)
    assert summary["fits_int32"] and summary["conv_units"] == 38

    report = compare_integer_model(
        model, int_model, instantiate(cfg.dataloader.test), num_images=5, dataset_name="digits_tiny_val"
    )
    print(report.format())
    assert report.num_images == 5 and report.detections_integer == 5 * 100
    # the fake-quant arithmetic without float32 rounding: the engine computes it exactly
    ref = report.float64
    assert ref.max_step_diff <= 1.0 and ref.beyond_one_step == 0
    assert ref.max_step_diff < 1e-6  # in fact exact up to float64 rounding
    assert ref.detections_matched == ref.detections_ref == report.detections_integer
    assert abs(report.ap_integer - report.ap_reference64) <= 0.1
    # the fake-quant model as it runs (float32): the same AP; most detections the same (a value
    # within float32 noise of a rounding boundary lands on the other integer, and that spreads)
    assert report.ap_diff <= 0.1
    assert report.match_rate >= 0.8

    # saved and loaded, it computes the same integers
    path = str(tmp_path / "int.pth")
    saved = save_integer_model(model, cfg, path, note="test")
    assert integer_summary(saved) == summary
    loaded = load_integer_model(path)
    assert loaded.metadata == {"note": "test"}
    batch = next(iter(instantiate(cfg.dataloader.test)))
    with torch.no_grad():
        images = int_model.preprocess_image(batch)
        a = int_model.backbone(images.tensor)
        b = loaded.backbone(images.tensor)
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == torch.int64 for k in a)
        feats = [a[k] for k in int_model.head_in_features]
        for x, y in zip(int_model.head.forward_integer(feats), loaded.head.forward_integer(feats)):
            assert all(torch.equal(u, v) for u, v in zip(x, y))
        # through detectron2's own forward and post-processing
        out = loaded(batch)
    assert len(out[0]["instances"]) == 100
    assert int(a["p3"].abs().max()) <= int_model.backbone.feature_max_abs["p3"]


def calibrated_aqd(config, **quant):
    """A detector (3 classes, width 32) AQD-quantized with ``quant`` and calibrated, in eval
    mode (:func:`helpers.calibrated_detector`)."""
    return calibrated_detector(config, dict(AQD, **quant))


@pytest.mark.parametrize("arch", ["fcos", "atss"])
def test_integer_engine_fcos_atss_w2(arch):
    model = calibrated_aqd(f"configs/{arch}_r18_fp32.py", weight_bits=2, act_bits=2)
    int_model = to_integer(model)
    report = compare_integer_model(model, int_model, synthetic_batches(1, seed=3))
    assert report.float64.max_step_diff < 1e-6 and report.float64.beyond_one_step == 0
    assert report.match_rate_ref64 == 1.0 and report.detections_integer > 0
    assert set(report.output_steps) == {"cls_score", "bbox_pred", "ctrness"}


def test_integer_engine_per_channel_weights():
    """RetinaNet AQD W4 with one weight step per output channel: the engine computes the
    float64 fake-quant model exactly, with per-channel accumulator and output scales."""
    model = calibrated_aqd("configs/retina_r18_fp32.py", weight_granularity="channel")
    int_model = to_integer(model)
    assert integer_summary(int_model)["fits_int32"]
    head = int_model.head
    # per output and level: the predictor's per-channel scales, the same on every level
    assert all(
        len(per_level) == 5 and all(s is per_level[0] for s in per_level) and per_level[0].shape == (getattr(head, n).conv.weight.shape[0],)
        for n, per_level in zip(head.output_names, head.output_scales)
    )
    report = compare_integer_model(model, int_model, synthetic_batches(1, seed=3))
    assert report.float64.max_step_diff < 1e-6 and report.float64.beyond_one_step == 0
    assert report.match_rate_ref64 == 1.0 and report.detections_integer > 0
    assert "per channel" in report.format()


def test_integer_awareness_switches(trained_aqd):
    """Integer-aware layers only act with fake quantization on (calibration sees FP32); off
    (set_integer_aware), the model is the plain fake-quant simulation and is not converted."""
    _, model, _ = trained_aqd
    q = copy.deepcopy(model)
    set_fake_quant(q, False)
    assert all(m.accumulator_step() is None for m in q.modules() if hasattr(m, "accumulator_step"))
    q = set_integer_aware(copy.deepcopy(model), False)
    x = [{"image": torch.rand(3, 96, 96) * 255}]
    with torch.no_grad():
        a, b = model.backbone(model.preprocess_image(x).tensor), q.backbone(q.preprocess_image(x).tensor)
    assert not all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(IntegerConversionError, match="not integer-aware"):
        to_integer(q)


@pytest.mark.parametrize(
    "quant, match",
    [
        (None, r"an FP32 model \(not quantized\)"),
        ({"method": "lq", "scope": "aqd_star"}, r"AQD\*, quant.scope='aqd_star'"),
        ({"method": "lsq"}, r"AQD\*, quant.scope='aqd_star'"),
        (dict(AQD, overrides={"backbone.bottom_up.res3.0.conv2": None}), r"partially quantized.*res3\.0\.conv2"),
    ],
)
def test_engine_refuses_models_not_fully_quantized(quant, match):
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/retina_r18_fp32.py"))
    cfg.model.num_classes = 3
    cfg.model.backbone.out_channels = 32
    model = instantiate(cfg.model)
    if quant is not None:
        quantize_model(model, quant)
    with pytest.raises(IntegerConversionError, match=match) as e:
        to_integer(model)
    assert "configs/retina_r18_aqd_w4.py" in str(e.value) and "quant.scope='aqd'" in str(e.value)


def test_engine_refuses_uncalibrated_model():
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/retina_r18_fp32.py"))
    cfg.model.num_classes = 3
    cfg.model.backbone.out_channels = 32
    model = quantize_model(instantiate(cfg.model), dict(AQD))
    with pytest.raises(IntegerConversionError, match="never initialized"):
        to_integer(model)


# ------------------------------------------------------------------------------------------
# tools/export_integer.py
# ------------------------------------------------------------------------------------------
def export_tool():
    return load_tool("export_integer")


TOOL_TINY = [
    "model.backbone.out_channels=32",
    "dataloader.test.dataset.names=digits_tiny_val",
    "dataloader.test.mapper.augmentations.0.short_edge_length=128",
    "dataloader.test.num_workers=0",
]


def test_export_tool(trained_aqd, tmp_path, capsys):
    _, _, ckpt = trained_aqd
    tool = export_tool()
    out = str(tmp_path / "int.pth")
    report = tool.run(tool.parse_args([
        "--config-file", os.path.join(ROOT, "configs/retina_r18_aqd_w4.py"), "--checkpoint", ckpt,
        "--output", out, "--num-images", "2", "--report-json", str(tmp_path / "r.json"), *TOOL_TINY,
    ]))  # fmt: skip
    text = capsys.readouterr().out
    for line in ("vs fake-quant float32 (as run)", "vs fake-quant float64", "head outputs: max |diff|",
                 "match rate", "COCO AP: fake-quant", "time per image", "every accumulator fits int32",
                 "verdict vs fake-quant float64: head outputs within +-1 step: yes; same detections "
                 "after NMS: yes; COCO AP within 0.1: yes", "verdict vs fake-quant float32:"):
        assert line in text, text
    assert report.num_images == 2 and os.path.isfile(tmp_path / "r.json")
    assert load_integer_model(out).metadata["checkpoint"] == ckpt


@pytest.mark.parametrize(
    "config, extra, match",
    [
        ("configs/retina_r18_aqdstar_w4.py", [], "quant.scope='aqd_star'"),
        ("configs/retina_r18_aqd_w4.py", ["--checkpoint", "/nonexistent/model_final.pth"], "does not exist"),
    ],
)
def test_export_tool_user_errors(trained_aqd, tmp_path, capsys, config, extra, match):
    _, _, ckpt = trained_aqd
    tool = export_tool()
    args = ["--config-file", os.path.join(ROOT, config), "--checkpoint", ckpt, *extra, "--output",
            str(tmp_path / "x.pth"), *TOOL_TINY]
    with pytest.raises(SystemExit) as e:
        tool.run(tool.parse_args(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


# ------------------------------------------------------------------------------------------
# Eq. 6 in one native pass (float32, CPU): bit-identical to the PyTorch ops
# ------------------------------------------------------------------------------------------
from hqod.quantization.integer_layers import _eq6  # noqa: E402


@pytest.fixture
def native_calls(monkeypatch):
    """The names of the native kernels called (through functional._native.load); the
    fake-quant backend is restored afterwards."""
    calls = []
    real_load = functional._native.load
    assert real_load() is not None, "the native kernels did not build (is a C compiler installed?)"

    class Lib:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real_load(), name)

    monkeypatch.setattr(functional._native, "load", lambda: Lib())
    backend = functional.get_backend()
    yield calls
    functional.set_backend(backend)


def eq6_args(shape, acc_step, seed, ties=False):
    """A conv output ``x`` (accumulator integers times ``acc_step``, with float noise; with
    ``ties``, half of it exactly at ``(k + 1/2) * acc_step``) and per-channel Eq. 6 parameters with
    negative, zero and positive ``alpha_z`` and ``round(s)``."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    eta = torch.randint(-300, 300, shape, generator=g).float()
    x = eta * acc_step * (1 + 1e-6 * torch.randn(shape, generator=g))
    if ties:
        half = torch.rand(shape, generator=g) < 0.5
        x = torch.where(half, (eta + 0.5) * acc_step, x)
    alpha_z = torch.randn(c, generator=g, dtype=torch.float64) * acc_step * 3
    alpha_z[torch.randperm(c, generator=g)[: max(1, c // 4)]] = 0.0
    s_round = torch.round(torch.randn(c, generator=g, dtype=torch.float64) * 40)
    s_round[0] = 0.0
    offset = torch.where(alpha_z == 0, torch.randn(c, generator=g, dtype=torch.float64), s_round * alpha_z)
    return x.contiguous(), alpha_z, s_round, offset


def eq6_eager(x, acc_step, alpha_z, s_round, offset):
    previous = functional.get_backend()
    functional.set_backend("eager")
    try:
        return _eq6(x, acc_step, alpha_z, s_round, offset)
    finally:
        functional.set_backend(previous)


@pytest.mark.parametrize("shape", [(2, 16, 9, 7), (1, 8, 33, 31), (2, 8, 70, 70), (4, 64, 17, 17)])
@pytest.mark.parametrize("acc_step", [2.0**-7, 3 * 2.0**-11, "random"])
def test_integer_bn_native_forward_is_bit_identical(shape, acc_step, native_calls):
    """One pass in C == torch.mul(x, 1 / acc_step).round_().add_(s).mul_(alpha_z) (+ beta where
    gamma = 0), bit for bit: ties (exact for a power-of-two step) to even, signed zeros, the
    parallel and multi-block paths (the two larger shapes)."""
    seed = sum(shape) * 7 + (0 if acc_step == "random" else int(1 / acc_step))
    if acc_step == "random":
        acc_step = float(torch.empty(()).uniform_(1e-5, 1e-2, generator=torch.Generator().manual_seed(seed)))
    x, alpha_z, s_round, offset = eq6_args(shape, acc_step, seed, ties=True)
    if acc_step == 2.0**-7:  # exact ties really occur
        v = torch.mul(x, 1.0 / acc_step)
        assert ((v - v.floor()) == 0.5).sum() > x.numel() // 4
    ref = eq6_eager(x, acc_step, alpha_z, s_round, offset)
    assert native_calls == []
    out = _eq6(x, acc_step, alpha_z, s_round, offset)
    assert native_calls == ["hqod_int_bn_forward_f32"]
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, ref)
    assert torch.equal(torch.signbit(out), torch.signbit(ref))  # -0.0 where torch has it
    zero = (alpha_z == 0).view(1, -1, 1, 1).expand_as(out)  # gamma = 0: the constant beta
    assert torch.equal(out[zero], offset.float().view(1, -1, 1, 1).expand_as(out)[zero])


@pytest.mark.parametrize("case", ["transposed", "channels_last", "float64", "inductor_backend"])
def test_integer_bn_native_fallbacks(case, native_calls):
    """What the kernel does not cover (non-contiguous, channels-last, float64, a backend other
    than auto/native) takes the PyTorch ops, with the same result as before."""
    acc_step = 3 * 2.0**-11
    x, alpha_z, s_round, offset = eq6_args((2, 16, 9, 7), acc_step, seed=7, ties=True)
    if case == "transposed":
        x = x.transpose(2, 3)
    elif case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "float64":
        x = x.double()
    else:
        functional.set_backend("inductor")  # its compiled kernels are for the fake quantizers only
    assert x.is_contiguous() == (case in ("float64", "inductor_backend"))
    ref = eq6_eager(x, acc_step, alpha_z, s_round, offset)
    out = _eq6(x, acc_step, alpha_z, s_round, offset)
    assert native_calls == []
    assert out.dtype == x.dtype and torch.equal(out, ref)
    # and the float32 native result of the same values, for the float32 cases
    if x.dtype == torch.float32 and case != "inductor_backend":
        functional.set_backend("auto")
        assert torch.equal(_eq6(x.contiguous(), acc_step, alpha_z, s_round, offset), ref.contiguous())
        assert native_calls == ["hqod_int_bn_forward_f32"]


@pytest.mark.parametrize("train", [True, False])
def test_integer_batch_norm_native_gradients_unchanged(train, native_calls):
    """integer_batch_norm with the native forward: the same output, input/gamma/beta gradients and
    running statistics as with the PyTorch ops (eager backend), bit for bit; a gamma = 0 channel
    included."""
    torch.manual_seed(11)
    bn = nn.BatchNorm2d(16)
    random_bn(bn, 12)
    with torch.no_grad():
        bn.weight[3] = 0.0
    acc_step = float(torch.empty(()).uniform_(1e-4, 1e-2))
    x0, _, _, _ = eq6_args((2, 16, 9, 7), acc_step, seed=13)
    g = torch.randn(x0.shape)
    results = {}
    for backend in ("eager", "auto"):
        functional.set_backend(backend)
        b = copy.deepcopy(bn).train(train)
        x = x0.clone().requires_grad_(True)
        z = integer_batch_norm(b, x, acc_step)
        z.backward(g)
        results[backend] = (z.detach(), x.grad, b.weight.grad, b.bias.grad, b.running_mean, b.running_var)
        assert native_calls == ([] if backend == "eager" else ["hqod_int_bn_forward_f32"])
    for a, e in zip(results["auto"], results["eager"]):
        assert torch.equal(a, e)
