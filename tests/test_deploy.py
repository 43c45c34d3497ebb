"""
Deployment to ONNX / ONNX Runtime (issue 17, hqod.deploy, tools/export_onnx.py): the Q/DQ conv
against the fake-quant conv it replaces (a bound derived from the int32 bias), the weight-unit
refinement by hand, FP32 export against PyTorch within 1e-4, quantized export run by ONNX
Runtime on integer kernels (QLinearConv) and equal to its PyTorch form, the detectron2 model
interface, clear refusals, the tool.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hqod.deploy import (
    DetectorNetwork,
    OnnxDetector,
    OnnxExportError,
    QDQConv2d,
    compare_onnx_model,
    executed_kernels,
    export_onnx,
    output_names,
    prepare_for_export,
)
from hqod.deploy.export import _refine_weight_units
from hqod.deploy.qdq import quantize_dequantize, quantize_dequantize_relu, quantize_relu_max_pool
from hqod.quantization import IntegerGrid, QConv2d

from helpers import calibrated_detector, load_tool, synthetic_batches

LSQ_W4 = {"method": "lsq", "scope": "aqd_star", "weight_bits": 4, "act_bits": 4}


def _images(model, seed=3):
    return model.preprocess_image(next(synthetic_batches(1, seed=seed))).tensor


def _ort_outputs(path, inputs, optimize=True, input_name="images", optimized_model=""):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if optimized_model:
        options.optimized_model_filepath = optimized_model
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, {input_name: inputs.numpy()})]


def test_refine_weight_units_by_hand():
    # 2-bit weights (|q| <= 2) after a 4-bit unsigned input (<= 15): k = min(127, 32767 // 30) // 2
    q = torch.tensor([-2, 1, 0, 1]).view(1, 4, 1, 1).repeat(2, 1, 1, 1)
    q[1] = torch.tensor([1, -1, 0, 1]).view(4, 1, 1)
    unsigned4 = IntegerGrid(step=0.5, eta_min=0, eta_max=15)
    refined, scale = _refine_weight_units(q, torch.tensor([0.1, 0.2], dtype=torch.float64), unsigned4)
    assert refined[0].flatten().tolist() == [-126, 63, 0, 63] and refined[1].flatten().tolist() == [127, -127, 0, 127]
    assert scale.tolist() == pytest.approx([0.1 / 63, 0.2 / 127])
    # an 8-bit signed input (uint8 up to 255 with zero point 128): 32767 // 510 = 64 -> k = 32
    signed8 = IntegerGrid(step=0.5, eta_min=-128, eta_max=127)
    refined, _ = _refine_weight_units(q, torch.ones(2, dtype=torch.float64), signed8)
    assert refined[0].flatten().tolist() == [-64, 32, 0, 32]
    # the same real weights
    assert torch.equal(refined.double() * torch.tensor([1 / 32, 1 / 64]).view(-1, 1, 1, 1), q.double())


def test_weights_that_would_saturate_x86_int8_kernels_are_uint8(tmp_path):
    """A conv of 8-bit weights on 8-bit activations: uint8 x int8 kernels without VNNI (this
    project's AVX2 machines) add product pairs in int16 and saturate, so such weights are held
    as uint8 with the zero point 128 (exact in every kernel). Hand case: 64 input channels of
    255 times weights of 127 over a 1x1 kernel = 2,072,640, output scale 20,000 -> 104."""
    import onnx
    from onnx import helper, numpy_helper

    grid = IntegerGrid(step=1.0, eta_min=0, eta_max=255)
    conv = QDQConv2d(
        input_grid=grid, weight_int=torch.full((8, 64, 1, 1), 127), weight_scale=torch.ones(1, 8),
        bias_int=torch.zeros(1, 8), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
    )
    assert conv.weight_int.dtype == torch.uint8 and conv.weight_zero_point.tolist() == [128] * 8
    x = torch.full((1, 64, 2, 2), 255.0)
    assert conv(x).flatten().tolist() == [64 * 255 * 127.0] * 32
    # the same weights as int8 in ONNX Runtime's own QLinearConv: what the uint8 form avoids
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (np.full((8, 64, 1, 1), 127, np.int8), "w"), (np.array(0, np.uint8), "xzp"), (np.array(0, np.int8), "wzp"),
        (np.array(1.0, np.float32), "xs"), (np.array(1.0, np.float32), "ws"), (np.array(20000.0, np.float32), "ys"),
        (np.array(0, np.uint8), "yzp")]]
    node = helper.make_node("QLinearConv", ["x", "xs", "xzp", "w", "ws", "wzp", "ys", "yzp"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [1, 64, 2, 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, [1, 8, 2, 2])], inits)
    path = str(tmp_path / "int8.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    import onnxruntime as ort

    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": np.full((1, 64, 2, 2), 255, np.uint8)})[0]
    vnni = any(f in open("/proc/cpuinfo").read() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    assert int(out.flat[0]) == (104 if vnni else 52)  # 52: saturated on this machine kind
    # and the uint8 form through ONNX Runtime
    uint8_conv = str(tmp_path / "uint8.onnx")
    _export_module(conv, torch.full((1, 64, 2, 2), 255.0), uint8_conv)
    assert _ort_outputs(uint8_conv, x, input_name="x")[0].flatten().tolist() == [64 * 255 * 127.0] * 32


def _export_module(module, x, path):
    # inside a Sequential, a QDQConv2d's default level is a constant, not a graph input
    torch.onnx.export(torch.nn.Sequential(module), (x,), path, dynamo=False, opset_version=13, input_names=["x"])


def test_qdq_conv_is_the_fake_quant_conv():
    """Every quantized conv of a calibrated RetinaNet (its BN folded) against the fake-quant
    conv on the same input: they differ only by the int32 bias's rounding, at most half a unit
    of the accumulator step per channel (plus float32 rounding)."""
    model = calibrated_detector("configs/retina_r18_fp32.py", LSQ_W4)
    exported = prepare_for_export(model)
    convs = {n: m for n, m in model.backbone.named_modules() if isinstance(m, QConv2d)}
    assert len(convs) == 28  # stem, 16 block convs, 3 shortcuts, 6 FPN convs, P6, P7
    g = torch.Generator().manual_seed(0)
    for name, conv in convs.items():
        qdq = exported.backbone.get_submodule(name)
        assert isinstance(qdq, QDQConv2d) and qdq.weight_int.dtype == torch.int8
        assert qdq.weight_int.abs().max() <= 127 and qdq.bias_int.dtype == torch.int32
        assert conv.activation is None  # detectron2's backbone applies its ReLUs in forward
        x = torch.randn(2, conv.in_channels, 12, 12, generator=g) * 2
        with torch.no_grad():
            ref, out = conv(x), qdq(x)
        bound = 0.5 * qdq.bias_scale[0].double().view(1, -1, 1, 1) + 1e-5 * ref.abs().max()
        assert ((ref.double() - out.double()).abs() <= bound).all(), name


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_free_grid_in_onnx(tmp_path, bits):
    """AQD Eq. 3's signed grid (levels (eta - (2^b - 1) / 2) * step): float ops in ONNX, plus a
    Q/DQ pair on the odd integers where they fit 8 bits; ONNX Runtime gives the PyTorch values
    exactly, zero (a rounding boundary of this grid) and the clipped ends included."""
    import onnx

    levels = 2**bits - 1
    grid = IntegerGrid(step=0.0123, eta_min=0, eta_max=levels, offset2=levels)
    module = _GridModule(grid)
    x = torch.cat([torch.randn(1000) * levels * 0.0123 / 2, torch.tensor([0.0, -1e-9, 1e-9, 1e3, -1e3])])
    path = str(tmp_path / "grid.onnx")
    torch.onnx.export(module, (x,), path, dynamo=False, opset_version=13, input_names=["x"], do_constant_folding=False)
    ops = [n.op_type for n in onnx.load(path).graph.node if n.op_type != "Constant"]
    assert ops[:6] == ["Div", "Add", "Round", "Clip", "Sub", "Mul"]
    assert ops[6:] == ([] if bits == 8 else ["QuantizeLinear", "Clip", "DequantizeLinear"])
    out = _ort_outputs(path, x, input_name="x")[0]
    ref = module(x)
    assert torch.equal(out, ref)
    assert ref[-5:].tolist() == pytest.approx([0.5 * 0.0123, 0.5 * 0.0123, 0.5 * 0.0123, levels / 2 * 0.0123, -levels / 2 * 0.0123])


@pytest.mark.parametrize("offset2", [0, 255])
def test_relu_on_the_grid(tmp_path, offset2):
    """relu(Q/DQ(x)) as one Q/DQ pair: on a grid with a zero level (signed 8 bits, eta in
    [-128, 127]) the ReLU is the clip of the integers at zero (levels 0..127 in uint8, zero
    point 0: QuantizeLinear, Clip, DequantizeLinear); on LQ's zero-free grid it stays a Relu."""
    import onnx

    eta_min, eta_max = (-128, 127) if offset2 == 0 else (0, 255)
    grid = IntegerGrid(step=0.05, eta_min=eta_min, eta_max=eta_max, offset2=offset2)
    x = torch.cat([torch.randn(1000) * 4, torch.tensor([0.0, -0.02, 0.03, 1e3, -1e3])])
    ref = torch.relu(quantize_dequantize(x, grid))
    module = _GridModule(grid, op=quantize_dequantize_relu)
    assert torch.equal(module(x), ref)
    path = str(tmp_path / "relu.onnx")
    torch.onnx.export(module, (x,), path, dynamo=False, opset_version=13, input_names=["x"], do_constant_folding=False)
    ops = [n.op_type for n in onnx.load(path).graph.node if n.op_type != "Constant"]
    if offset2 == 0:
        assert ops == ["QuantizeLinear", "Clip", "DequantizeLinear"]
        assert ref[-5:].tolist() == pytest.approx([0.0, 0.0, 0.05, 127 * 0.05, 0.0])
    else:
        assert ops[-1] == "Relu"
    assert torch.equal(_ort_outputs(path, x, input_name="x")[0], ref)


@pytest.mark.parametrize("offset2", [0, 255])
def test_stem_relu_and_pool_on_the_integers(tmp_path, offset2):
    """The ResNet stem after its conv, max_pool(relu(Q/DQ(x)), 3, 2, 1). On a signed 8-bit grid
    with a zero level, in ONNX the ReLU is a clip and the pool is wrapped in Q/DQ of one scale,
    which ONNX Runtime drops to pool the uint8 integers; on LQ's zero-free grid the ReLU's zeros
    are off the grid and stay zeros. Same values as PyTorch's ops on the dequantized map."""
    import onnx

    eta_min, eta_max = (-128, 127) if offset2 == 0 else (0, 255)
    grid = IntegerGrid(step=0.05, eta_min=eta_min, eta_max=eta_max, offset2=offset2)
    x = torch.randn(1, 3, 11, 10) * 3
    x[..., :3, :3] = -1.0  # a window of negatives only: its pooled value is 0
    ref = F.max_pool2d(torch.relu(quantize_dequantize(x, grid)), kernel_size=3, stride=2, padding=1)
    assert ref[0, 0, 0, 0] == 0
    module = _GridModule(grid, op=quantize_relu_max_pool)
    assert torch.equal(module(x), ref) and ref.shape == (1, 3, 6, 5)
    path = str(tmp_path / "stem.onnx")
    torch.onnx.export(module, (x,), path, dynamo=False, opset_version=13, input_names=["x"], do_constant_folding=False)
    if offset2:
        assert torch.equal(_ort_outputs(path, x, input_name="x")[0], ref)
        return
    ops = [n.op_type for n in onnx.load(path).graph.node if n.op_type != "Constant"]
    assert ops == ["QuantizeLinear", "Clip", "DequantizeLinear", "MaxPool", "QuantizeLinear", "Clip", "DequantizeLinear"]
    optimized = str(tmp_path / "opt.onnx")
    assert torch.equal(_ort_outputs(path, x, input_name="x", optimized_model=optimized)[0], ref)
    assert [n.op_type for n in onnx.load(optimized).graph.node] == ["QuantizeLinear", "Clip", "MaxPool", "Clip", "DequantizeLinear"]


class _GridModule(torch.nn.Module):
    def __init__(self, grid, op=quantize_dequantize):
        super().__init__()
        self.grid, self.op = grid, op

    def forward(self, x):
        return self.op(x, self.grid)


def test_nine_bit_weights_are_held_as_float():
    """LQ's 8-bit signed grid has 256 levels and no zero: odd integers up to 255, which int8
    cannot hold; such a conv keeps the same weights as floats (a float conv)."""
    model = calibrated_detector("configs/retina_r18_fp32.py", dict(LSQ_W4, method="lq"))
    stem = model.backbone.bottom_up.stem.conv1
    with torch.no_grad():
        stem.weight[0, 0, 0, 0] = 10 * stem.weight.abs().max()  # clipped to the outermost level
    qdq = prepare_for_export(model).backbone.bottom_up.stem.conv1
    assert not qdq.integer_weights and qdq.weight_float.shape == (1,) + stem.weight.shape
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert (stem(x) - qdq(x)).abs().max() <= 1e-5 * stem(x).abs().max()


def test_export_fp32_equals_pytorch(tmp_path):
    model = calibrated_detector("configs/retina_r18_fp32.py")
    path = str(tmp_path / "fp32.onnx")
    info = export_onnx(model, path, image_size=(96, 96))
    assert info["quantized_convs"] == 0 and info["outputs"] == output_names(model)
    assert output_names(model) == [f"{p}.{l}" for p in ("cls_score", "bbox_pred") for l in range(5)]
    images = _images(model)
    with torch.no_grad():
        ref = DetectorNetwork(model)(images)
    out = _ort_outputs(path, images)
    assert len(out) == 10
    for r, o in zip(ref, out):
        assert r.shape == o.shape and (r - o).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "arch,quant,integer_convs",
    [
        # 8 block conv1 + 2 towers x 4 convs x 5 levels: every conv whose output only one
        # quantizer reads; the others (residual and FPN adds, predictors) stay float
        ("retina", LSQ_W4, 48),
        # AQD*: LQ's signed activations have no zero level (Eq. 3): rounded by float ops, then
        # Q/DQ on the odd integers (4 bits) so that the next conv still runs on integers. Zero
        # is a rounding boundary of that grid, so float32 noise flips values near it: not
        # compared to the PyTorch form at the network level (test_zero_free_grid_in_onnx)
        ("retina", dict(LSQ_W4, method="lq"), 48),
        # scope aqd (integer BN, BN outputs and adds on 8-bit grids): with LSQ's grids 66 of the
        # 78 convs read and write integers; the 10 predictors (float logits) and P6/P7 do not
        ("retina", dict(LSQ_W4, scope="aqd"), 66),
        ("fcos", dict(LSQ_W4, scope="aqd", weight_bits=2, act_bits=2), 66),
        # AQD itself: LQ's 8-bit BN outputs have no zero level, so every conv output goes through
        # float rounding ops first (exact values, float convs)
        ("retina", dict(LSQ_W4, method="lq", scope="aqd"), 0),
        # FCOS's last bbox-tower conv feeds two quantized predictors (bbox_pred, ctrness)
        ("fcos", dict(LSQ_W4, method="tqt", weight_bits=2, act_bits=2), 43),
        ("atss", dict(LSQ_W4, weight_bits=8, act_bits=8, weight_granularity="channel"), 43),
    ],
)
def test_export_quantized_runs_integer_kernels(tmp_path, arch, quant, integer_convs):
    model = calibrated_detector(f"configs/{arch}_r18_fp32.py", quant)
    path, optimized = str(tmp_path / "q.onnx"), str(tmp_path / "opt.onnx")
    info = export_onnx(model, path, image_size=(96, 96))
    assert info["quantized_convs"] == 38 + (arch != "retina")  # + ctrness
    detector = OnnxDetector(model, path, optimized_model=optimized)
    kernels = executed_kernels(optimized)
    assert kernels.get("QLinearConv", 0) == integer_convs
    assert ("Clip" in kernels) == (quant["act_bits"] < 8)  # low-bit ranges clipped on the integers
    exported = prepare_for_export(model)
    # every weight in int8, the 8-bit predictors' -128 included
    assert all(m.integer_weights for m in exported.modules() if isinstance(m, QDQConv2d))
    if quant.get("scope") == "aqd" and quant["method"] != "lq":
        # grids with a zero level: the ReLUs after the residual adds, the stem's (which the
        # max pool reads) and FCOS's last box-tower ReLU (which two predictors read) are clips
        # of integers (quantize_dequantize_relu); ONNX Runtime drops the others, which one
        # QuantizeLinear reads: no float Relu is left
        assert "Relu" not in kernels
    if quant["method"] == "lq":
        return
    images = _images(model)
    with torch.no_grad():
        ref = DetectorNetwork(exported)(images)
    plain = _ort_outputs(path, images, optimize=False)  # Q/DQ as float ops: the graph's semantics
    fused = [p for per_pred in detector.predictions(images) for p in per_pred]
    levels = len(model.head_in_features)
    for k in range(0, len(ref), levels):  # one predictor, all levels
        r, p, f = (torch.cat([t.flatten() for t in outs[k: k + levels]]) for outs in (ref, plain, fused))
        scale = float(r.abs().max())
        # the file computes the PyTorch form: equal up to float32 rounding, except where the two
        # libraries' float convs round an activation within 1e-7 of a level boundary to the
        # other level, which moves the outputs downstream of it (with scope aqd's 8-bit BN
        # outputs such flips are frequent: up to 4 % of the range here, 0.3 % on average); a
        # wrongly folded BN or bias moves every output by about 10 %
        for a, b in ((r, p), (p, f)):  # ... and the integer kernels, their requantization
            assert (a - b).abs().mean() <= 5e-3 * scale and (a - b).abs().max() <= 0.05 * scale


def test_onnx_detector_is_a_detectron2_model(tmp_path):
    model = calibrated_detector("configs/retina_r18_fp32.py")
    path = str(tmp_path / "m.onnx")
    export_onnx(model, path, image_size=(96, 96))
    detector = OnnxDetector(model, path)
    batch = next(synthetic_batches(1, seed=3))
    with torch.no_grad():
        ref, out = model(batch), detector(batch)
    assert len(out) == 2 and all(len(o["instances"]) == len(r["instances"]) == 100 for o, r in zip(out, ref))
    assert out[0]["instances"].image_size == (96, 96)
    report = compare_onnx_model(model, detector, synthetic_batches(2, seed=3))
    assert report.num_images == 4 and report.max_abs_diff <= 1e-4
    # FP32: outputs equal to 1e-5; the only mismatches are near-ties in the top-100 cut
    assert report.match_rate >= 0.9
    assert report.seconds_onnx > 0 and report.seconds_torch > 0


def test_integer_bias_trains_and_exports_exactly():
    """``quant.integer_bias`` under scope aqd_star, RetinaNet with multi-level BN in the head:
    the backbone's BNs and each head level's BN compute AQD Eq. 6 from the accumulator, a
    training step reaches the BN parameters (straight-through) and the steps, and the export's
    PyTorch form (integer biases) gives the fake-quant model's head outputs up to float32 noise:
    a mean difference under 1e-6 of each output's range (measured: <= 8.2e-8, the largest 4.2e-7),
    where the float BN shifts rounded at export move the box outputs by 3.1e-3-3.5e-3 on average
    (at most 1.5-1.7 %)."""
    from detectron2.utils.events import EventStorage

    model = calibrated_detector("configs/retina_r18_fp32.py", dict(LSQ_W4, integer_bias=True))
    images = _images(model)
    with torch.no_grad():
        ref, out = DetectorNetwork(model)(images), DetectorNetwork(prepare_for_export(model))(images)
    assert len(ref) == 10 and all((r - o).abs().mean() <= 1e-6 * r.abs().max() for r, o in zip(ref, out))
    model.train()
    with EventStorage():
        losses = model(next(synthetic_batches(1, seed=4)))
    sum(losses.values()).backward()
    tower_bn = model.head.cls_subnet[1]._modules["0"]  # level 0's BN after the first tower conv
    conv = model.backbone.bottom_up.res2[0].conv1
    for grad in (tower_bn.weight.grad, conv.norm.bias.grad, conv.input_quant.scale.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_integer_bias_onnx_runtime_computes_the_float64_model(tmp_path):
    """With ``quant.integer_bias`` ONNX Runtime's integer kernels compute the fake-quant function
    with exact rounding: measured here 672 of 48,888 head outputs beyond one step of the float64
    model (1.4 %; 18,444 of the float32 one) and all 400 detections matched to it (375 to float32);
    without it, where the export rounds the float BN shifts, 48,070 (98 %). Margins: 5 % and 50 %."""
    beyond = {}
    for integer_bias in (False, True):
        model = calibrated_detector("configs/retina_r18_fp32.py", dict(LSQ_W4, integer_bias=integer_bias))
        path = str(tmp_path / f"m{integer_bias}.onnx")
        export_onnx(model, path, image_size=(96, 96))
        report = compare_onnx_model(model, OnnxDetector(model, path), synthetic_batches(2, seed=3), reference64=True)
        beyond[integer_bias] = report.beyond_one_step64 / report.num_outputs
        if integer_bias:
            assert report.beyond_one_step64 < report.beyond_one_step / 5
            assert report.detections_matched64 >= 0.95 * report.detections_torch64 > 0
            assert report.match_rate64 >= 0.95 and report.to_dict()["match_rate64"] == report.match_rate64
            assert "vs PyTorch in float64 (the same function, exact rounding)" in report.format()
    assert beyond[True] < 0.05 and beyond[False] > 0.5


def test_integer_bn_is_folded_exactly():
    """Scope aqd: AQD's integer BN (Eq. 5-6) folds into the Q/DQ conv without any rounding (its
    shift is an integer in accumulator units already): the exported conv gives the fake-quant
    conv's BN output, on the output quantizer's grid, for all but values within float32 noise
    of a level boundary."""
    model = calibrated_detector("configs/retina_r18_fp32.py", dict(LSQ_W4, scope="aqd"))
    exported = prepare_for_export(model)
    g = torch.Generator().manual_seed(0)
    for name in ("backbone.bottom_up.res2.0.conv1", "backbone.bottom_up.res3.0.shortcut", "backbone.bottom_up.res4.1.conv2"):
        conv, qdq = model.get_submodule(name), exported.get_submodule(name)
        assert qdq.output_grid is not None and qdq.output_grid == conv.norm.output_quant.integer_grid()
        x = torch.rand(2, conv.in_channels, 12, 12, generator=g) * 3
        with torch.no_grad():
            ref, out = conv(x), qdq(x)
        steps = ((ref - out).abs() / qdq.output_grid.scale)
        assert steps.max() <= 1.0 + 1e-4 and (steps > 1e-3).float().mean() <= 1e-3, name


def test_lq_integer_bn_rounds_the_accumulator_as_the_fake_quant_conv():
    """AQD itself (LQ, scope aqd): the export's conv rounds its accumulator before Eq. 6 as the
    fake-quant conv does, so from the same input it gives the fake-quant conv's output levels
    (equal except where the two float convs' sums land on either side of a half-integer
    accumulator, a few in a million), where folding the BN into the weights flipped 1e-4 of them
    on a trained model."""
    model = calibrated_detector("configs/retina_r18_fp32.py", dict(LSQ_W4, method="lq", scope="aqd"))
    exported = prepare_for_export(model)
    g = torch.Generator().manual_seed(0)
    for name in ("backbone.bottom_up.stem.conv1", "backbone.bottom_up.res3.0.shortcut", "backbone.bottom_up.res4.1.conv2"):
        conv, qdq = model.get_submodule(name), exported.get_submodule(name)
        assert qdq.exact_accumulator and qdq.output_grid.offset2 % 2 == 1
        x = torch.rand(2, conv.in_channels, 24, 24, generator=g) * 3
        with torch.no_grad():
            ref, out = conv(x), qdq(x)
        assert (ref != out).float().mean() <= 1e-4, name


def test_refuses_non_uniform_ptq_weights():
    from hqod.ptq import use_llaq
    from hqod.quantization import calibrate

    model = calibrated_detector("configs/retina_r18_fp32.py", LSQ_W4)
    use_llaq(model, ["head.bbox_pred"])  # Reg-PTQ's log-affine levels on the box predictor
    calibrate(model, synthetic_batches(1, seed=2), num_images=2)
    with pytest.raises(OnnxExportError, match=r"head\.bbox_pred\.weight_quant: LLAQ .* non-uniform levels"):
        prepare_for_export(model)


def test_refuses_uncalibrated_model_and_old_opset(tmp_path):
    from hqod.quantization import quantize_model

    model = calibrated_detector("configs/retina_r18_fp32.py")
    with pytest.raises(OnnxExportError, match="opset 12"):
        export_onnx(model, str(tmp_path / "m.onnx"), image_size=(96, 96), opset=12)
    quantize_model(model, LSQ_W4)
    with pytest.raises(OnnxExportError, match=r"76 quantizers were never calibrated \(backbone\.fpn_lateral3\.weight_quant, \.\.\.\)"):
        prepare_for_export(model)


def test_export_tool(tiny_digits, tmp_path, capsys):
    tool = load_tool("export_onnx")
    model = calibrated_detector("configs/retina_r18_fp32.py")
    checkpoint = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    common = ["--config-file", "configs/retina_r18_fp32.py", "model.num_classes=3", "model.backbone.out_channels=32"]
    overrides = [
        "dataloader.test.dataset.names=digits_tiny_val",
        "dataloader.test.mapper.augmentations.0.short_edge_length=128",
        "dataloader.test.num_workers=0",
    ]
    result = tool.run(tool.parse_args(
        ["--checkpoint", str(checkpoint), "--verify", "--float64", "--num-images", "2", "--report-json", str(tmp_path / "r.json")]
        + common + overrides
    ))
    out = capsys.readouterr().out
    assert (tmp_path / "model_final.onnx").is_file() and (tmp_path / "r.json").is_file()
    assert "ONNX Runtime runs 0 convolutions as integer kernels" in out and "COCO AP: PyTorch" in out
    verdicts = [line.split(":")[0].strip() for line in out.splitlines() if "verdict" in line]
    assert verdicts == ["verdict vs PyTorch float32 (as run)", "verdict vs PyTorch float64"]
    assert result["verify"]["num_images"] == 2 and result["verify"]["max_abs_diff"] <= 1e-4
    with pytest.raises(SystemExit) as e:
        tool.run(tool.parse_args(["--checkpoint", str(tmp_path / "missing.pth")] + common))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.pth does not exist" in err[0]
