"""
quantize_model on RetinaNet-R18 and FCOS-R18 (configs/*_fp32.py): every conv reached, first /
last layers at 8 bits, activation signs, AQD scope, multi-level BN by level, FP32 -> QAT
checkpoint loading, calibration, state-dict round trip, optimizer groups, config errors.
Small inputs (2 images of 128x128) keep the file fast.
"""
import copy
import math
import os

import pytest
import torch
from torch import nn

from detectron2.config import LazyConfig, instantiate
from detectron2.layers import CycleBatchNormList
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from hqod.engine import Checkpointer, UserError
from hqod.quantization import functional
from hqod.quantization.multilevel import shared_bn_keys
from hqod.quantization import (
    MultiLevelHead,
    MultiLevelBatchNorm,
    QBasicBlock,
    QBatchNorm2d,
    QConv2d,
    QFPN,
    QuantConfig,
    calibrate,
    get_qat_optimizer_params,
    quantize_model,
    quantizers_of,
    set_fake_quant,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "retina": "configs/retina_r18_fp32.py",
    "fcos": "configs/fcos_r18_fp32.py",
    "atss": "configs/atss_r18_fp32.py",  # hqod's ATSS (RetinaNetHead + centerness)
}
PREDICTORS = {
    "retina": ["head.cls_score", "head.bbox_pred"],
    "fcos": ["head.cls_score", "head.bbox_pred", "head.ctrness"],
    "atss": ["head.cls_score", "head.bbox_pred", "head.ctrness"],
}
NUM_CLASSES = 3


@pytest.fixture(autouse=True)
def default_kernels():
    """Model-level tests run the default backend ("auto": the native C kernels on CPU); the
    other backends are checked against the references in test_quantizers.py, and the eager one
    in one training test here. torch.compile's ~20 s compile time is kept out of this file."""
    previous = functional.get_backend()
    functional.set_backend("auto")
    yield
    functional.set_backend(previous)


@pytest.fixture(scope="module")
def fp32_models():
    """One FP32 model per detector, with non-trivial BN statistics (a few training-mode
    forwards), to be deep-copied by the tests."""
    models = {}
    for arch, path in CONFIGS.items():
        cfg = LazyConfig.load(os.path.join(ROOT, path))
        cfg.model.num_classes = NUM_CLASSES
        torch.manual_seed(0)
        model = instantiate(cfg.model)
        model.train()
        with torch.no_grad(), EventStorage():
            for seed in range(2):
                model(make_batch(seed))
        model.eval()
        models[arch] = model
    return models


def make_batch(seed=0, n=2, size=128):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 110.0, 120.0]])
        inst = Instances((size, size), gt_boxes=Boxes(boxes), gt_classes=torch.tensor([0, 2]))
        batch.append({"image": torch.rand(3, size, size, generator=g) * 255, "instances": inst})
    return batch


def quantized(fp32_models, arch, **quant):
    model = copy.deepcopy(fp32_models[arch])
    return quantize_model(model, dict(quant))


def head_outputs(model, batch):
    images = model.preprocess_image(batch)
    features = model.backbone(images.tensor)
    return model.head([features[f] for f in model.head_in_features])


def flat(outputs):
    return torch.cat([t.flatten() for out in outputs for t in out])


# ------------------------------------------------------------------------------------------
def test_quantized_layers_are_built_from_the_float_ones(fp32_models):
    """from_float constructs new layers holding the float layers' parameters (the same objects,
    the same state-dict keys); the float layers are left as they were, and the lists where a
    parent also keeps its children (detectron2's FPN.lateral_convs) hold the new layers."""
    model = copy.deepcopy(fp32_models["retina"])
    fpn, keys = model.backbone, {k for k in model.state_dict() if k.startswith("backbone.")}
    float_lateral, float_block = fpn.lateral_convs[0], fpn.bottom_up.res2[0]
    weight = float_lateral.weight
    rng = torch.get_rng_state()
    quantize_model(model, {"method": "lq", "scope": "aqd"})
    assert torch.equal(torch.get_rng_state(), rng)  # nothing was randomly initialized
    lateral = model.backbone.lateral_convs[0]
    assert type(model.backbone).__name__ == "QFPN" and type(fpn).__name__ == "FPN"
    assert type(lateral).__name__ == "QConv2d" and lateral is model.backbone.fpn_lateral5
    assert fpn.lateral_convs[0] is float_lateral
    assert lateral.weight is weight and set(model.state_dict()) >= keys
    assert type(float_lateral).__name__ == "Conv2d" and not hasattr(float_lateral, "weight_quant")
    assert type(float_block).__name__ == "BasicBlock" and type(float_block.conv1).__name__ == "Conv2d"
    assert [type(m).__name__ for m in model.backbone.output_convs] == ["QConv2d"] * 3


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["retina", "fcos", "atss"])
def test_every_conv_quantized_first_last_8bit(fp32_models, arch):
    fp32 = fp32_models[arch]
    convs = {n for n, m in fp32.named_modules() if isinstance(m, nn.Conv2d)}
    model = quantized(fp32_models, arch, method="lsq", weight_bits=4, act_bits=4)
    qconvs = {n: m for n, m in model.named_modules() if isinstance(m, QConv2d)}
    assert set(qconvs) == convs and len(convs) == (38 if arch == "retina" else 39)
    assert isinstance(model.head, MultiLevelHead) and model.head.float_type is type(fp32.head)
    assert [n for n, _ in model.head.named_children()] == [n for n, _ in fp32.head.named_children()]

    eight = {"backbone.bottom_up.stem.conv1", *PREDICTORS[arch]}
    for name, m in qconvs.items():
        bits = 8 if name in eight else 4
        assert (m.weight_quant.bits, m.input_quant.bits) == (bits, bits), name
        assert m.weight_quant.signed, name
    # activation sign: unsigned exactly where a ReLU produces the input
    signed_inputs = {n for n, m in qconvs.items() if m.input_quant.signed}
    assert signed_inputs == {
        "backbone.bottom_up.stem.conv1",  # the image
        "backbone.fpn_output3", "backbone.fpn_output4", "backbone.fpn_output5",  # lateral + top-down
        "backbone.top_block.p6",  # p5
        "head.cls_subnet.0", "head.bbox_subnet.0",  # FPN features
    }
    # AQD* leaves BN and adds alone; the head gets multi-level BN
    assert not any(isinstance(m, (QBatchNorm2d, QBasicBlock, QFPN)) for m in model.modules())
    mlbn = [m for m in model.modules() if isinstance(m, MultiLevelBatchNorm)]
    assert len(mlbn) == 8 and all(m.output_quant is None for m in mlbn)
    assert not any(isinstance(m, CycleBatchNormList) for m in model.modules())


@pytest.mark.parametrize("arch, backend", [("retina", "auto"), ("fcos", "eager")])
def test_aqd_scope_quantizes_bn_and_adds_and_trains(fp32_models, arch, backend):
    functional.set_backend(backend)
    fp32 = fp32_models[arch]
    num_bn = sum(isinstance(m, nn.BatchNorm2d) for m in fp32.backbone.modules())
    model = quantized(fp32_models, arch, method="lq", scope="aqd", weight_bits=2, act_bits=2)
    qbn = [m for m in model.modules() if isinstance(m, QBatchNorm2d)]
    # W2A2: conv weights and inputs at 2 bits, BN outputs and adds at output_bits (default 8)
    assert len(qbn) == num_bn == 26 and all(m.output_quant.bits == 8 for m in qbn)
    mlbn = [m for m in model.modules() if isinstance(m, MultiLevelBatchNorm)]
    assert mlbn and all(m.output_quant.bits == 8 for m in mlbn)
    blocks = [m for m in model.modules() if isinstance(m, QBasicBlock)]
    assert len(blocks) == 8 and all(b.add_quant.signed and b.add_quant.bits == 8 for b in blocks)
    assert all(q.bits == 8 for q in model.backbone.fuse_quants)
    convs = [m for m in model.modules() if isinstance(m, QConv2d) and m.weight_quant.bits == 2]
    assert convs and all(c.input_quant.bits == 2 for c in convs)
    assert isinstance(model.backbone, QFPN) and len(model.backbone.fuse_quants) == 2
    # forward + backward: finite losses, every quantizer parameter gets a gradient
    model.train()
    with EventStorage():
        losses = model(make_batch(3))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    quant = quantizers_of(model)
    assert all(q.is_initialized for q in quant.values())
    no_grad = [n for n, q in quant.items() for p in q.parameters() if p.grad is None]
    assert not no_grad


def test_unknown_layer_reported(fp32_models):
    model = copy.deepcopy(fp32_models["retina"])
    model.backbone.bottom_up.stem.extra = nn.GroupNorm(4, 64)
    with pytest.raises(ValueError, match=r"backbone\.bottom_up\.stem\.extra \(GroupNorm\)"):
        quantize_model(model, {})
    assert not any(isinstance(m, QConv2d) for m in model.modules())  # nothing was changed
    quantize_model(model, {"keep_unknown_fp32": True})
    assert type(model.backbone.bottom_up.stem.extra) is nn.GroupNorm


def test_overrides_and_fp32_first_last(fp32_models):
    model = quantized(
        fp32_models, "retina", first_last_bits=None,
        overrides={"backbone.bottom_up.res5.*": 8, "head.cls_subnet.3": None,
                   "backbone.fpn_output*": {"act_bits": 6}},
    )
    assert type(model.backbone.bottom_up.stem.conv1) is not QConv2d
    assert type(model.head.cls_score) is nn.Conv2d and type(model.head.cls_subnet[3]) is nn.Conv2d
    assert model.backbone.bottom_up.res5[0].conv1.weight_quant.bits == 8
    out = model.backbone.fpn_output4
    assert (out.weight_quant.bits, out.input_quant.bits) == (4, 6)


@pytest.mark.parametrize(
    "quant, match",
    [
        ({"method": "dorefa"}, r"quant.method must be one of \['lq', 'lsq', 'lsq_torch', 'tqt'\]"),
        ({"scope": "all"}, r"quant.scope must be one of \['aqd_star', 'aqd'\]"),
        ({"weight_bits": 1}, r"quant.weight_bits=1: bit widths are ints in 2\.\.8 \(1 bit leaves no usable grid"),
        ({"act_bits": "4"}, r"quant.act_bits='4': .* \(a string; write quant.act_bits=4 without quotes\)"),
        ({"first_last_bits": 16}, r"first_last_bits"),
        ({"overrides": {"head.*": 9}}, r"overrides\['head.\*'\]"),
        ({"wbits": 4}, r"Unknown quant config keys \['wbits'\]"),
        ({"integer_bias": "yes"}, r"quant.integer_bias must be a bool; got 'yes'"),
    ],
)
def test_config_errors(quant, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig.from_cfg(quant)


def test_config_node_loads():
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/common/quant.py"))
    q = QuantConfig.from_cfg(cfg.quant)
    assert (q.method, q.weight_bits, q.act_bits, q.scope, q.first_last_bits) == ("lsq", 4, 4, "aqd_star", 8)
    assert cfg.quant.calib_images == 256


def test_calibration_without_calib_images_uses_quant_config_default(monkeypatch):
    """A quant node without ``calib_images`` calibrates on QuantConfig's default (256), the one
    configs/common/quant.py shows, not a default of the training loop's own."""
    from omegaconf import OmegaConf

    from hqod.engine import train_loop

    calls = []
    monkeypatch.setattr(train_loop, "calibrate", lambda model, loader, num_images: calls.append(num_images))
    for quant in ({"method": "lsq"}, {"calib_images": 8}):
        cfg = OmegaConf.create({"train": {"init_checkpoint": ""}, "quant": quant})
        train_loop.init_qat(cfg, model=None, data_loader=None)
    assert calls == [256, 8]


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["retina", "fcos"])
def test_multi_level_bn_picks_bn_by_level(fp32_models, arch):
    model = quantized(fp32_models, arch, method="lsq")
    set_fake_quant(model, False)
    model.eval()
    head = model.head
    mlbn = head.cls_subnet[1]
    assert isinstance(mlbn, MultiLevelBatchNorm) and mlbn.num_levels == 5
    with torch.no_grad():  # make every level's BN distinct
        for level, bn in enumerate(mlbn.levels):
            bn.running_mean.fill_(0.1 * level)
            bn.weight.fill_(1.0 + level)
    channels = head.cls_subnet[0].in_channels
    x = torch.randn(2, channels, 8, 8)
    conv_out = head.cls_subnet[0](x)
    for level in (3, 0, 4):  # any order: the level is an argument, not a call count
        expected = mlbn.levels[level](conv_out)
        torch.testing.assert_close(mlbn(conv_out, level), expected)
        torch.testing.assert_close(head.cls_subnet(x, level), head.cls_subnet[2:](expected, level))
    with pytest.raises(ValueError, match="needs the FPN level"):
        mlbn(conv_out)
    # the head runs level l through BN l, whatever came before
    feats = [torch.randn(1, channels, s, s) for s in (16, 8, 4, 2, 1)]
    full = head(feats)
    single = head.forward_level(feats[2], 2)
    for out_all, out_one in zip(full, single):
        torch.testing.assert_close(out_all[2], out_one)


def test_multi_level_bn_from_shared_bn():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.arange(4.0))
        bn.weight.fill_(2.0)
    mlbn = MultiLevelBatchNorm.from_norm(bn, 3)
    for level in mlbn.levels:
        assert torch.equal(level.running_mean, bn.running_mean) and torch.equal(level.weight, bn.weight)
    # a shared-BN state dict loads into every level
    fresh = MultiLevelBatchNorm(3, 4)
    fresh.load_state_dict(bn.state_dict())
    for level in fresh.levels:
        assert torch.equal(level.running_mean, bn.running_mean) and torch.equal(level.weight, bn.weight)


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["retina", "fcos"])
@pytest.mark.parametrize("scope", ["aqd_star", "aqd"])
def test_fp32_checkpoint_loads_and_matches_without_fake_quant(fp32_models, arch, scope, tmp_path):
    fp32 = fp32_models[arch]
    state = fp32.state_dict()
    torch.save({"model": state, "iteration": 5}, tmp_path / "fp32.pth")
    cfg = LazyConfig.load(os.path.join(ROOT, CONFIGS[arch]))
    cfg.model.num_classes = NUM_CLASSES
    torch.manual_seed(1)  # different random weights than the FP32 model
    model = quantize_model(instantiate(cfg.model), {"method": "tqt", "scope": scope})
    # strict: a missing key other than the quantizers' (calibration makes them) would be refused
    extra = Checkpointer(model, strict=True).load(str(tmp_path / "fp32.pth"))
    assert extra == {"iteration": 5}
    # CycleBatchNormList shared affine -> every level
    assert len(shared_bn_keys(model, state)) == 16
    set_fake_quant(model, False)
    model.eval()
    batch = make_batch(7)
    with torch.no_grad():
        torch.testing.assert_close(flat(head_outputs(model, batch)), flat(head_outputs(fp32, batch)), atol=1e-5, rtol=1e-5)
    set_fake_quant(model, True)  # measured: max difference 0.9e-3 to 1.2e-3 (outputs' std 2.2)
    with torch.no_grad():
        assert not torch.allclose(flat(head_outputs(model, batch)), flat(head_outputs(fp32, batch)), atol=1e-4, rtol=0)


def test_shared_bn_checkpoint_maps_to_every_level(fp32_models, tmp_path):
    """An FP32 head with one shared BN per tower position (HQOD's FP32 models) loads into
    every level of multi-level BN."""
    fp32 = fp32_models["retina"]
    shared = {}
    for k, v in fp32.state_dict().items():
        parts = k.split(".")
        # head.cls_subnet.1.<level>.running_mean -> head.cls_subnet.1.running_mean (level 0)
        if k.startswith("head.") and len(parts) == 5 and parts[3].isdigit():
            if parts[3] == "0":
                shared[".".join(parts[:3] + parts[4:])] = v
            continue
        shared[k] = v
    model = quantized(fp32_models, "retina")
    assert "head.cls_subnet.1.running_var" in shared_bn_keys(model, shared)
    torch.save(shared, tmp_path / "shared.pth")
    Checkpointer(model, strict=True).load(str(tmp_path / "shared.pth"))
    for level in model.head.bbox_subnet[7].levels:
        assert torch.equal(level.running_var, fp32.head.bbox_subnet[7][0].running_var)
        assert torch.equal(level.weight, fp32.head.bbox_subnet[7].weight)


def test_checkpoint_of_other_architecture_rejected(fp32_models, tmp_path):
    cfg = LazyConfig.load(os.path.join(ROOT, CONFIGS["retina"]))
    cfg.model.num_classes = 7  # another dataset
    other = instantiate(cfg.model)
    path = tmp_path / "other.pth"
    torch.save({"model": other.state_dict()}, path)
    model = quantized(fp32_models, "retina")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UserError, match=r"does not fit this model: 2 shape mismatches \(e\.g\. head\.cls_score\."):
        Checkpointer(model, strict=True).load(str(path))
    after = model.state_dict()  # refused before anything was loaded
    assert all(torch.equal(after[k], v) for k, v in before.items())
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, tmp_path / "unrelated.pth")
    with pytest.raises(UserError, match=r"lacks \d+ of the model's \d+ entries"):
        Checkpointer(model, strict=True).load(str(tmp_path / "unrelated.pth"))


# ------------------------------------------------------------------------------------------
def test_calibration_initializes_steps_and_state_dict_round_trip(fp32_models):
    loader = [make_batch(10, n=1), make_batch(11, n=1), make_batch(12, n=1)]
    # step_init="mse": the weight step is 2^(k/8) times LSQ's rule, k in -24..16, of least error
    searched = quantized(fp32_models, "fcos", method="lsq", scope="aqd")
    assert calibrate(searched, loader, num_images=2) == 2
    model = quantized(fp32_models, "fcos", method="lsq", scope="aqd", step_init="paper")
    quant = quantizers_of(model)
    assert not any(q.is_initialized for q in quant.values())
    seen = calibrate(model, loader, num_images=2)
    assert seen == 2
    assert all(q.is_initialized and q.fake_quant_enabled and not q.observer_enabled for q in quant.values())
    w = model.head.cls_subnet[0].weight.detach()
    expected = 2 * w.abs().mean() / (7**0.5)
    torch.testing.assert_close(model.head.cls_subnet[0].weight_quant.step, expected)
    k = 8 * math.log2(searched.head.cls_subnet[0].weight_quant.step.item() / expected.item())
    assert abs(k - round(k)) < 1e-3 and -24 <= round(k) <= 16
    with torch.no_grad():
        err = [(m.head.cls_subnet[0].weight_quant(w) - w).pow(2).sum() for m in (searched, model)]
    assert err[0] <= err[1]
    # one QAT step, then a fresh model restores everything from the state dict
    model.train()
    opt = torch.optim.SGD(get_qat_optimizer_params(model, weight_decay_norm=0.0), lr=1e-3, weight_decay=1e-4)
    with EventStorage():
        sum(model(make_batch(4)).values()).backward()
    opt.step()
    state = copy.deepcopy(model.state_dict())
    restored = quantized(fp32_models, "fcos", method="lsq", scope="aqd")
    restored.load_state_dict(state, strict=True)
    for name, q in quantizers_of(restored).items():
        assert q.is_initialized and torch.equal(q.step, quant[name].step), name
    model.eval()
    restored.eval()
    batch = make_batch(9)
    with torch.no_grad():
        torch.testing.assert_close(flat(head_outputs(restored, batch)), flat(head_outputs(model, batch)), atol=0, rtol=0)
    # resuming does not re-initialize: a training forward leaves the steps as loaded
    restored.train()
    with torch.no_grad(), EventStorage():
        restored(make_batch(5))
    for name, q in quantizers_of(restored).items():
        assert torch.equal(q.step, quant[name].step), name


def test_optimizer_params_zero_weight_decay_for_quantizers(fp32_models):
    model = quantized(fp32_models, "retina", method="tqt")
    groups = get_qat_optimizer_params(model, weight_decay_norm=0.0, weight_decay=1e-4)
    quant = {id(p) for q in quantizers_of(model).values() for p in q.parameters()}
    seen = set()
    for g in groups:
        for p in g["params"]:
            seen.add(id(p))
            if id(p) in quant:
                assert g["weight_decay"] == 0.0
    assert quant <= seen and len(seen) == len({id(p) for p in model.parameters()})
    assert any(g["weight_decay"] == 1e-4 for g in groups)


def test_multi_level_bn_is_sync_bn_with_several_processes(monkeypatch):
    from detectron2.layers import NaiveSyncBatchNorm

    from hqod.quantization import multilevel

    monkeypatch.setattr(multilevel.comm, "get_world_size", lambda: 2)
    mlbn = MultiLevelBatchNorm.from_norm(nn.BatchNorm2d(8), 5)
    expected = nn.SyncBatchNorm if torch.cuda.is_available() else NaiveSyncBatchNorm
    assert all(type(bn) is expected for bn in mlbn.levels)
    monkeypatch.setattr(multilevel.comm, "get_world_size", lambda: 1)
    assert all(type(bn) is nn.BatchNorm2d for bn in MultiLevelBatchNorm(5, 8).levels)


def test_new_head_is_one_declaration(fp32_models):
    """A head that adds a predictor (RetinaNetHead + centerness) needs one declaration of its
    towers and predictors: multi-level BN, 8-bit predictors and signs then follow. Without it
    (its BN would be shared over the levels) quantize_model refuses and says what to declare."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

    from hqod.modeling import dense_head

    class CenternessHead(RetinaNetHead):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.centerness = nn.Conv2d(16, 1, 3, padding=1)

        def forward(self, features):
            logits, deltas = super().forward(features)
            return logits, deltas, [self.centerness(self.bbox_subnet(f)) for f in features]

    model = copy.deepcopy(fp32_models["retina"])
    channels = model.head.cls_subnet[0].in_channels
    model.head = CenternessHead(input_shape=[ShapeSpec(channels=channels)] * 5, num_classes=3,
                                num_anchors=1, conv_dims=[16, 16], norm="BN")
    with pytest.raises(ValueError, match=(
        r"the head 'head' \(.*CenternessHead\) has BN layers \(cls_subnet.1, cls_subnet.4, bbox_subnet.1, "
        r"bbox_subnet.4\) shared over the detector's 5 levels but declares no towers and predictors. "
        r"Declare them with @hqod.modeling.dense_head\(predictors=")):
        quantize_model(copy.deepcopy(model), {"method": "lsq"})

    dense_head(predictors={"cls_score": "cls_subnet", "bbox_pred": "bbox_subnet", "centerness": "bbox_subnet"})(CenternessHead)
    float_head = copy.deepcopy(model.head).eval()
    quantize_model(model, {"method": "lsq"})
    head = model.head
    assert isinstance(head, MultiLevelHead) and head.num_levels == 5
    assert head.centerness.weight_quant.bits == 8 and not head.centerness.input_quant.signed
    assert sum(isinstance(m, MultiLevelBatchNorm) for m in head.modules()) == 4
    feats = [torch.randn(2, channels, s, s) for s in (16, 8, 4, 2, 1)]
    head.eval()
    set_fake_quant(head, False)  # no fake quantization: exactly the float head, every level
    with torch.no_grad():
        for ours, ref in zip(head(feats), float_head(feats)):
            assert len(ours) == 5
            for a, b in zip(ours, ref):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_head_declaration_is_checked(fp32_models):
    from hqod.modeling import dense_head

    class ScaledHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.pred = nn.Conv2d(8, 4, 1)
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, features):
            return ([self.pred(self.tower(f)) * self.scale for f in features],)

    model = copy.deepcopy(fp32_models["retina"])
    model.head = ScaledHead()
    dense_head(predictors={"pred": "towr"})(ScaledHead)
    with pytest.raises(ValueError, match=r"ScaledHead declares the tower 'towr', which is not an nn.Sequential child of the head \(children: \['pred', 'tower'\]\)"):
        quantize_model(copy.deepcopy(model), {"method": "lsq"})
    dense_head(predictors={"pred": "tower"})(ScaledHead)
    with pytest.raises(ValueError, match=r"ScaledHead has parameters outside its declared towers and predictors: \['scale'\]"):
        quantize_model(model, {"method": "lsq"})


def test_bottleneck_block_aqd():
    """ResNet-50 style blocks: convs reached (all ReLU-fed), residual add quantized."""
    from detectron2.modeling.backbone.resnet import BottleneckBlock

    from hqod.quantization import QBottleneckBlock

    holder = nn.Sequential(
        BottleneckBlock(64, 256, bottleneck_channels=32, stride=2, norm="BN"),
        BottleneckBlock(256, 256, bottleneck_channels=32, norm="BN"),
    )
    x = torch.relu(torch.randn(2, 64, 16, 16))
    holder.eval()
    with torch.no_grad():
        ref = holder(x)
    quantize_model(holder, {"scope": "aqd", "method": "lsq", "act_bits": 3, "output_bits": 3})
    assert all(isinstance(b, QBottleneckBlock) and b.add_quant.bits == 3 for b in holder)
    convs = [m for m in holder.modules() if isinstance(m, QConv2d)]
    assert len(convs) == 7 and not any(c.input_quant.signed for c in convs)
    set_fake_quant(holder, False)
    with torch.no_grad():
        torch.testing.assert_close(holder(x), ref)
    set_fake_quant(holder, True)
    holder.train()
    holder(x).sum().backward()
    assert all(p.grad is not None for p in holder.parameters())


def test_step_init_reaches_every_quantizer_and_is_checked():
    from detectron2.modeling.backbone.resnet import BasicBlock

    from hqod.quantization.quantizers import Quantizer

    for given, expected in (({}, "mse"), ({"step_init": "paper"}, "paper")):
        block = BasicBlock(8, 8, norm="BN")
        block = quantize_model(block, {"scope": "aqd", "method": "lq", **given})
        inits = [m.step_init for m in block.modules() if isinstance(m, Quantizer)]
        assert len(inits) == 7 and set(inits) == {expected}  # 2 weights, 2 inputs, 2 BN outputs, 1 add
    with pytest.raises(ValueError, match=r"quant.step_init must be one of \['mse', 'paper', 'minmax'\]; got 'percentile'"):
        quantize_model(BasicBlock(8, 8, norm="BN"), {"step_init": "percentile"})
