"""
ONNX export of a detector's network: backbone + FPN + head, from the normalized, padded image
tensor to the head's raw outputs (one per predictor and FPN level, named ``"<predictor>.<level>"``,
e.g. ``cls_score.0``). Resizing, normalization, anchor decoding and NMS stay in detectron2's
Python pre- and post-processing, as in detectron2's own export (:class:`~.runtime.OnnxDetector`
runs them around an ONNX Runtime session).

* An FP32 detector is exported as it is (plain ONNX; ONNX Runtime folds its BNs).
* A quantized detector of scope ``aqd_star`` (convs quantized: LSQ, TQT, AQD*) is exported with
  every quantized conv as :class:`~.qdq.QDQConv2d`: its weight integers and per-channel scales,
  its input quantizer's grid, the BN after it folded in (in the head: per FPN level, the weight
  integers shared). ONNX Runtime fuses these Q/DQ patterns into integer kernels.

What cannot be exported is refused with one :class:`OnnxExportError` naming the layer:
scope ``aqd`` (integer BN outputs and c/2^d-aligned adds), signed activation grids without a
zero level (AQD Eq. 3), weight integers outside int8, norms other than BN, quantizers that
were never calibrated.
"""
import copy
import os
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from detectron2.layers import FrozenBatchNorm2d

from hqod.modeling.dense_head import dense_head_spec
from hqod.quantization.calibration import uninitialized_quantizers
from hqod.quantization.modules import QConv2d
from hqod.quantization.multilevel import LevelSequential, MultiLevelBatchNorm, MultiLevelHead
from hqod.quantization.quantizers import Quantizer

from .qdq import QDQConv2d, fits_uint8

__all__ = ["OnnxExportError", "DetectorNetwork", "export_onnx", "output_names", "prepare_for_export"]

DEFAULT_OPSET = 13  # per-axis DequantizeLinear


class OnnxExportError(ValueError):
    """A layer of the model has no ONNX form here; the message names it and says why."""


def _bn_affine(norm: nn.Module, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(gamma / sigma, beta - mu * gamma / sigma)`` of an inference-mode BN, float64."""
    if not isinstance(norm, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
        raise OnnxExportError(
            f"{name}: a {type(norm).__qualname__} after a quantized conv cannot be folded into it "
            "(BN and FrozenBN can)."
        )
    mult = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    return mult, norm.bias.double() - norm.running_mean.double() * mult


def _active_grid(quantizer: Quantizer, name: str):
    if not (quantizer.fake_quant_enabled and quantizer.is_initialized):
        raise OnnxExportError(
            f"{name}: fake quantization is off; turn it on (hqod.quantization.set_fake_quant) to export "
            "the quantized model."
        )
    try:
        return quantizer.integer_grid()
    except ValueError as e:  # a grid that is not integers times a step (PTQ's log-affine LLAQ)
        raise OnnxExportError(f"{name}: {e}") from e


def _input_grid(conv: QConv2d, name: str):
    grid = _active_grid(conv.input_quant, f"{name}.input_quant")
    if grid.m == 1 and not fits_uint8(grid.q_min, grid.q_max):
        raise OnnxExportError(f"{name}.input_quant: the range [{grid.q_min}, {grid.q_max}] does not fit 8 bits.")
    return grid


def _weight_integers(conv: QConv2d, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The weight's integers (int64) and per-output-channel scales (float64) on its quantizer's
    grid: ``Q_w(W) = q * scale``."""
    grid = _active_grid(conv.weight_quant, f"{name}.weight_quant")
    channels = conv.weight.shape[0]
    scale = torch.as_tensor(grid.scale, dtype=torch.float64).expand(channels).clone()
    with torch.no_grad():
        w_hat = conv.weight_quant(conv.weight).double()
    q = torch.round(w_hat / scale.view(-1, 1, 1, 1))
    if not torch.allclose(q * scale.view(-1, 1, 1, 1), w_hat, rtol=1e-6, atol=0):
        raise RuntimeError(f"{name}: the fake-quantized weight is not on its quantizer's grid.")
    return q.long(), scale


# The largest |product| of a uint8 activation and an int8 weight, times 2, that x86 int8 kernels
# without VNNI add in int16 (vpmaddubsw) without saturating.
_INT16_PAIR_MAX = 2**15 - 1


def _refine_weight_units(q_w: torch.Tensor, scale: torch.Tensor, input_range) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The same weights as the integers ``q_w * k`` and scales ``scale / k`` with the largest
    integer ``k`` per output channel that keeps them in int8 (and the int16 pair sums of x86
    kernels without VNNI unsaturated): ``QLinearConv`` takes the bias as an int32 in units of
    ``alpha_x * scale``, which at 2-4 bits is too coarse for a BN shift (a half-unit rounding error
    of up to ~2 % of an activation step, the same in every pixel); ``k`` makes the unit finer.
    """
    max_input = input_range[1] + (0 if input_range[0] >= 0 else 128)  # as uint8 (zero point 128 if signed)
    largest = q_w.abs().flatten(1).amax(dim=1).clamp_min(1)
    limit = min(127, _INT16_PAIR_MAX // (2 * max(max_input, 1)))
    k = torch.clamp(limit // largest, min=1)
    return q_w * k.view(-1, 1, 1, 1), scale / k.double()


def _scope_aqd(what: str) -> str:
    return (
        f"{what} of scope 'aqd' (integer BN outputs, c/2^d-aligned adds) has no Q/DQ form here yet; "
        "export a model of scope 'aqd_star' (LSQ, TQT, AQD*) or use the integer engine "
        "(tools/export_integer.py)."
    )


def qdq_conv(conv: QConv2d, name: str, norms: List[Optional[nn.Module]]) -> QDQConv2d:
    """The :class:`QDQConv2d` of a quantized conv followed by ``norms`` (one BN per level, or
    ``[None]``): the BN folded into the weight scale and the int32 bias."""
    if conv.integer_aware:
        raise OnnxExportError(_scope_aqd(f"{name}: an integer-aware conv"))
    input_grid = _input_grid(conv, name)
    q_w, w_scale = _weight_integers(conv, name)
    integer_weights = bool(q_w.min() >= -128 and q_w.max() <= 127)  # else 9-bit: LQ's zero-free 8 bits
    if integer_weights:
        q_w, w_scale = _refine_weight_units(q_w, w_scale, (input_grid.q_min, input_grid.q_max))
    bias = conv.bias.double() if conv.bias is not None else torch.zeros(q_w.shape[0], dtype=torch.float64)
    scales, biases = [], []
    for level, norm in enumerate(norms):
        mult, shift = (
            (torch.ones_like(bias), torch.zeros_like(bias)) if norm is None
            else _bn_affine(norm, f"{name} (its norm, level {level})")
        )
        scales.append(w_scale * mult)
        biases.append(bias * mult + shift)
    scales, biases = torch.stack(scales), torch.stack(biases)
    common = dict(
        input_grid=input_grid, weight_scale=scales, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, activation=conv.activation,
    )
    if not integer_weights:
        weights = q_w.double()[None] * scales.view(scales.shape + (1, 1, 1))
        return QDQConv2d(weight_int=None, weight_float=weights, bias_float=biases, **common)
    # Q/DQ convs take their bias in units of the accumulator step alpha_x * scale
    bias_int = torch.round(biases / (input_grid.scale * scales))
    if bias_int.abs().max() >= 2**31:
        raise OnnxExportError(f"{name}: the folded bias does not fit int32 in accumulator units.")
    return QDQConv2d(weight_int=q_w, bias_int=bias_int, **common)


class QDQTower(nn.Module):
    """A head tower of the exported model: its quantized convs with the next multi-level BN
    folded per level (:class:`QDQConv2d`), the other layers as they were; ``forward(x, level)``."""

    def __init__(self, layers: List[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x, level: int):
        for layer in self.layers:
            x = layer(x, level) if isinstance(layer, QDQConv2d) else layer(x)
        return x


def _qdq_tower(tower: LevelSequential, name: str) -> QDQTower:
    layers = list(tower.named_children())
    out, skip = [], set()
    for i, (idx, layer) in enumerate(layers):
        if i in skip:
            continue
        if isinstance(layer, MultiLevelBatchNorm):
            raise OnnxExportError(f"{name}.{idx}: a multi-level BN that does not follow a quantized conv.")
        if isinstance(layer, QConv2d):
            nxt = layers[i + 1][1] if i + 1 < len(layers) else None
            if isinstance(nxt, MultiLevelBatchNorm):
                if nxt.output_quant is not None:
                    raise OnnxExportError(_scope_aqd(f"{name}.{layers[i + 1][0]}: a BN with a quantized output"))
                skip.add(i + 1)
                norms = nxt.levels
            else:
                norms = [layer.norm]
            out.append(qdq_conv(layer, f"{name}.{idx}", norms))
        else:
            out.append(layer)
    return QDQTower(out)


def _replace(root: nn.Module, name: str, new: nn.Module):
    """Put ``new`` in place of the submodule ``name``, also in the plain lists that hold it
    (detectron2's FPN keeps its convs in ``lateral_convs`` / ``output_convs`` as well)."""
    old = root.get_submodule(name)
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
    for module in root.modules():
        for value in vars(module).values():
            if isinstance(value, list):
                value[:] = [new if item is old else item for item in value]


def prepare_for_export(model: nn.Module) -> nn.Module:
    """A copy of the detector with every quantized conv (and the BN it is folded with) replaced
    by its Q/DQ form; an FP32 detector is copied as it is. Raises :class:`OnnxExportError` for
    what has no ONNX form here (module docstring)."""
    missing = uninitialized_quantizers(model)
    if missing:
        raise OnnxExportError(
            f"{len(missing)} quantizers were never calibrated ({missing[0]}{', ...' if len(missing) > 1 else ''}): "
            "export a trained (or calibrated) quantized model."
        )
    model = copy.deepcopy(model).cpu().eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, LevelSequential):
            _replace(model, name, _qdq_tower(module, name))
    for name, module in list(model.named_modules()):
        if isinstance(module, QConv2d):
            _replace(model, name, qdq_conv(module, name, [module.norm]))
    left = [n for n, m in model.named_modules() if isinstance(m, Quantizer)]
    if left:
        raise OnnxExportError(_scope_aqd(f"{', '.join(left[:4])}{' ...' if len(left) > 4 else ''}: quantizers outside quantized convs"))
    return model


def output_names(model: nn.Module) -> List[str]:
    """``"<predictor>.<level>"`` for every head output, in the order of :class:`DetectorNetwork`."""
    head = model.head
    spec = head.spec if isinstance(head, MultiLevelHead) else dense_head_spec(type(head))
    if spec is None:
        raise OnnxExportError(f"The head {type(head).__qualname__} declares no predictors (hqod.modeling.dense_head).")
    return [f"{p}.{level}" for p in spec.predictors for level in range(len(model.head_in_features))]


class DetectorNetwork(nn.Module):
    """The part of a dense detector that is exported: ``images`` (N, 3, H, W), normalized and
    padded as ``preprocess_image`` does -> the head's outputs, flattened predictor by predictor
    and level by level (:func:`output_names`)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.backbone = detector.backbone
        self.head = detector.head
        self.in_features = list(detector.head_in_features)

    def forward(self, images):
        features = self.backbone(images)
        outputs = self.head([features[f] for f in self.in_features])
        return tuple(o for per_level in outputs for o in per_level)


def export_onnx(model: nn.Module, path: str, *, image_size: Tuple[int, int], opset: int = DEFAULT_OPSET) -> Dict:
    """
    Export ``model``'s network (:class:`DetectorNetwork` of :func:`prepare_for_export`) to
    ``path``, traced on a zero image of ``image_size`` (H, W, multiples of the backbone's size
    divisibility); batch, height and width stay dynamic. Checks the file with the ONNX checker.
    Returns ``{"outputs": names, "quantized_convs": n, "opset": opset}``.
    """
    import onnx

    if opset < DEFAULT_OPSET:
        raise OnnxExportError(f"opset {opset} has no per-channel DequantizeLinear; use {DEFAULT_OPSET} or later.")
    exported = prepare_for_export(model)
    network = DetectorNetwork(exported).eval()
    names = output_names(exported)
    dynamic = {"images": {0: "batch", 2: "height", 3: "width"}}
    dynamic.update({n: {0: "batch", 2: f"h{n.rpartition('.')[2]}", 3: f"w{n.rpartition('.')[2]}"} for n in names})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # PyTorch's TorchScript-based exporter: it emits the Q/DQ nodes of the autograd functions'
    # ``symbolic`` (the torch.export-based one would need onnxscript translations); its
    # deprecation notice and the tracer's notes on detectron2's shape checks are not the user's
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            network, (torch.zeros(1, 3, *image_size),), path, dynamo=False, opset_version=opset,
            input_names=["images"], output_names=names, dynamic_axes=dynamic,
            do_constant_folding=False,
        )
    onnx.checker.check_model(path)
    return {
        "outputs": names,
        "quantized_convs": sum(isinstance(m, QDQConv2d) for m in exported.modules()),
        "opset": opset,
    }
