"""
ONNX export of a detector's network: backbone + FPN + head, from the normalized, padded image
tensor to the head's raw outputs (one per predictor and FPN level, named ``"<predictor>.<level>"``,
e.g. ``cls_score.0``). Resizing, normalization, anchor decoding and NMS stay in detectron2's
Python pre- and post-processing, as in detectron2's own export (:class:`~.runtime.OnnxDetector`
runs them around an ONNX Runtime session).

* An FP32 detector is exported as it is (plain ONNX; ONNX Runtime folds its BNs).
* A quantized detector has every quantized conv exported as :class:`~.qdq.QDQConv2d`: its weight
  integers and per-channel scales, its input quantizer's grid, the BN after it folded in (in the
  head: per FPN level, the weight integers shared). ONNX Runtime fuses these Q/DQ patterns into
  integer kernels where a quantizer reads the conv's output; a ReLU6 in between is dropped where
  the reader's grid has no negative level, its top level lowered to the level of 6 (the same
  values; MobileNetV2's expansion and depthwise convs).
* Integer-aware convs (scope ``aqd``, or ``aqd_star`` with ``quant.integer_bias``): the integer
  BN folds exactly (its shift is an integer in accumulator units); otherwise a float BN shift
  is rounded to the int32 bias unit.
* Scope ``aqd`` (AQD): the BN's output quantizer follows the conv, and the residual blocks
  (:class:`QDQResidualBlock`, MobileNetV2's :class:`QDQInvertedResidual`) and the FPN
  (:class:`QDQFPN`) add as AQD Eq. 7 does: each input times its alignment factor (``c / 2^d``
  for the larger-scale one), the sum on the add quantizer's grid. Those factors are float
  multiplies in the graph.

What cannot be exported is refused with one :class:`OnnxExportError` naming the layer: grids
that are not integers times a step (PTQ's log-affine LLAQ), integer ranges beyond 8 bits of an
activation quantizer with a zero level, norms other than BN, quantizers that were never
calibrated.
"""
import copy
import os
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling.backbone.resnet import BasicStem

from hqod.modeling.dense_head import dense_head_spec
from hqod.modeling.mobilenet import MobileNetV2
from hqod.utils import bn_affine, rebuild_as, replace_child
from hqod.quantization.calibration import uninitialized_quantizers
from hqod.quantization.integer_layers import integer_bias_value, integer_bn_params
from hqod.quantization.modules import QFPN, QConv2d, QInvertedResidual, QMobileNetV2, QResNet, _QuantAddBlock, add_alignment
from hqod.quantization.multilevel import LevelSequential, MultiLevelBatchNorm, MultiLevelHead
from hqod.quantization.quantizers import Quantizer

from .qdq import INT16_PAIR_LIMIT, QDQConv2d, fits_uint8, quantize_dequantize, quantize_dequantize_relu, quantize_relu_max_pool, uint8_max

__all__ = [
    "OnnxExportError", "DetectorNetwork", "QDQTower", "QDQStem", "QDQResidualBlock", "QDQInvertedResidual", "QDQFPN", "export_onnx",
    "output_names",
    "prepare_for_export",
]

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
    return bn_affine(norm, torch.float64)


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


def _activation_grid(quantizer: Quantizer, name: str):
    """An activation quantizer's grid, which Q/DQ holds in uint8 (or, without a zero level, float
    ops emulate)."""
    grid = _active_grid(quantizer, name)
    if grid.m == 1 and not fits_uint8(grid.q_min, grid.q_max):
        raise OnnxExportError(f"{name}: the range [{grid.q_min}, {grid.q_max}] does not fit 8 bits.")
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




def _refine_weight_units(q_w: torch.Tensor, scale: torch.Tensor, input_grid) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The same weights as the integers ``q_w * k`` and scales ``scale / k`` with the largest
    integer ``k`` per output channel that keeps them in int8 and the int16 pair sums of x86
    kernels without VNNI unsaturated (:data:`~.qdq.INT16_PAIR_LIMIT`): ``QLinearConv`` takes the
    bias as an int32 in units of ``alpha_x * scale``, which at 2-4 bits is too coarse for a BN
    shift (a half-unit rounding error of up to ~3 % of an activation step, the same in every
    pixel); ``k`` makes the unit finer.
    """
    largest = q_w.abs().flatten(1).amax(dim=1).clamp_min(1)
    limit = min(127, INT16_PAIR_LIMIT // (2 * max(uint8_max(input_grid), 1)))
    k = torch.clamp(limit // largest, min=1)
    return q_w * k.view(-1, 1, 1, 1), scale / k.double()


def qdq_conv(
    conv: QConv2d, name: str, norms: List[Optional[nn.Module]], output_quant: Optional[Quantizer] = None,
    input_upper: Optional[float] = None,
) -> QDQConv2d:
    """
    The :class:`QDQConv2d` of a quantized conv followed by ``norms`` (one BN per level, or
    ``[None]``) whose output ``output_quant`` quantizes (scope ``aqd``; None: none): the BN
    folded into the weight scale and the int32 bias. An integer-aware conv (scope ``aqd``,
    ``quant.integer_bias``): its bias is the integer of AQD Eq. 4 and its BN AQD's integer BN
    (Eq. 5-6), ``(eta_conv + round(s)) * alpha_z``: its scale ``alpha_z = alpha_conv * gamma /
    sigma`` goes into the weight scale and ``round(s)`` into the integer bias — exactly, no
    rounding added — and the BN's output quantizer, if any, follows the conv. ``input_upper``:
    the conv's input was clipped there (a ReLU6 the export drops): its grid's top level lowered
    to match.
    """
    input_grid = _activation_grid(conv.input_quant, f"{name}.input_quant")
    if input_upper is not None:
        input_grid = conv.input_quant.clipped_integer_grid(input_upper)
    q_w, w_scale = _weight_integers(conv, name)
    acc_step = input_grid.scale * w_scale  # alpha_conv = alpha_x * alpha_w (AQD Eq. 4)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(w_scale)
    if conv.integer_aware:
        bias = integer_bias_value(bias, acc_step) * acc_step
    output_grid = None if output_quant is None else _activation_grid(output_quant, f"{name} (its output quantizer)")
    if conv.integer_aware and output_grid is not None and output_grid.m == 2 and all(n is not None for n in norms):
        # AQD's own grids (LQ: no zero level): float rounding ops follow the conv, so ONNX
        # Runtime runs it in float; as in the fake-quant model, its accumulator is rounded to
        # an integer before Eq. 6 (float noise of the conv removed; folding the BN into the
        # weights instead flipped 5-100x more output levels than the fake-quant conv does)
        return _exact_accumulator_conv(conv, norms, input_grid, q_w, w_scale, acc_step, bias, output_grid)
    scales, biases, dead = [], [], torch.zeros_like(w_scale, dtype=torch.bool)
    for level, norm in enumerate(norms):
        what = f"{name} (its norm, level {level})"
        if conv.integer_bn(norm):
            alpha_z, s_round, offset = integer_bn_params(
                norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps, acc_step
            )
            mult = alpha_z / acc_step
            dead |= alpha_z == 0  # gamma = 0: the constant output beta (``offset``)
            total = torch.where(alpha_z == 0, offset, (bias / acc_step + s_round) * alpha_z)
        else:
            mult, shift = (torch.ones_like(bias), torch.zeros_like(bias)) if norm is None else _bn_affine(norm, what)
            dead |= mult == 0
            total = bias * mult + shift
        scales.append(w_scale * torch.where(mult == 0, torch.ones_like(mult), mult))
        biases.append(total)
    q_w = torch.where(dead.view(-1, 1, 1, 1), torch.zeros_like(q_w), q_w)
    integer_weights = bool(q_w.min() >= -128 and q_w.max() <= 127)  # else 9-bit: LQ's zero-free 8 bits
    scales, biases = torch.stack(scales), torch.stack(biases)
    if integer_weights:
        q_w, scales = _refine_weight_units(q_w, scales, input_grid)
    common = dict(
        input_grid=input_grid, weight_scale=scales, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, activation=conv.activation,
        output_grid=output_grid,
    )
    if not integer_weights:
        weights = q_w.double()[None] * scales.view(scales.shape + (1, 1, 1))
        return QDQConv2d(weight_int=None, weight_float=weights, bias_float=biases, **common)
    # Q/DQ convs take their bias in units of the accumulator step alpha_x * scale (for AQD's
    # integer BN: (b_int + round(s)) * k, an integer already)
    bias_int = torch.round(biases / (input_grid.scale * scales))
    if bias_int.abs().max() >= 2**31:
        raise OnnxExportError(f"{name}: the folded bias does not fit int32 in accumulator units.")
    return QDQConv2d(weight_int=q_w, bias_int=bias_int, **common)


def _exact_accumulator_conv(conv, norms, input_grid, q_w, w_scale, acc_step, bias, output_grid) -> QDQConv2d:
    """The :class:`QDQConv2d` that computes AQD Eq. 4-6 as the fake-quant conv does: the float
    conv of the quantized input and weight, its accumulator ``round(x / alpha_conv)``, then
    ``(eta_conv + b_int + round(s)) * alpha_z`` per level (``beta`` where ``gamma = 0``)."""
    acc_bias, out_scale, out_offset = [], [], []
    for norm in norms:
        alpha_z, s_round, offset = integer_bn_params(norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps, acc_step)
        zero = alpha_z == 0
        acc_bias.append(torch.where(zero, torch.zeros_like(s_round), torch.round(bias / acc_step) + s_round))
        out_scale.append(alpha_z)
        out_offset.append(torch.where(zero, offset, torch.zeros_like(offset)))
    zeros = torch.zeros(1, q_w.shape[0])
    weights = (  # int8 where the integers fit (LQ's 8-bit zero-free weights need 9 bits: float)
        dict(weight_int=q_w, bias_int=zeros) if q_w.min() >= -128 and q_w.max() <= 127
        else dict(weight_int=None, weight_float=(q_w.double() * w_scale.view(-1, 1, 1, 1))[None], bias_float=zeros)
    )
    return QDQConv2d(
        input_grid=input_grid, weight_scale=w_scale[None], stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, activation=conv.activation, output_grid=output_grid,
        accumulator=dict(step=acc_step, bias=torch.stack(acc_bias), scale=torch.stack(out_scale), offset=torch.stack(out_offset)),
        **weights,
    )


class QDQTower(nn.Module):
    """A head tower of the exported model: its quantized convs with the next multi-level BN
    folded per level (:class:`QDQConv2d`), the other layers as they were; ``forward(x, level)``.
    ``readers``: how many predictors read the tower. ONNX Runtime drops a float ``Relu`` only
    where one ``QuantizeLinear`` reads it; where the tower's last ReLU has more readers (FCOS's
    box tower: the box deltas and the centerness) and follows a conv whose output is quantized
    (scope ``aqd``), it is the clip of that conv's integers instead
    (:func:`~.qdq.quantize_dequantize_relu`: the same values, no float op)."""

    def __init__(self, layers: List[nn.Module], readers: int = 1):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        last = len(layers) - 2
        self.relu_on_integers = [  # the conv whose ReLU is folded into its output quantizer
            i == last and readers > 1 and isinstance(layer, QDQConv2d) and layer.output_grid is not None
            and layer.activation is None and isinstance(layers[-1], nn.ReLU)
            for i, layer in enumerate(layers)
        ]

    def forward(self, x, level: int):
        folded = False
        for layer, relu_on_integers in zip(self.layers, self.relu_on_integers):
            if folded:  # this ReLU was applied on the integers
                folded = False
            elif relu_on_integers:
                x, folded = layer(x, level, output_op=quantize_dequantize_relu), True
            else:
                x = layer(x, level) if isinstance(layer, QDQConv2d) else layer(x)
        return x


def _qdq_tower(tower: LevelSequential, name: str, readers: int) -> QDQTower:
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
                skip.add(i + 1)
                out.append(qdq_conv(layer, f"{name}.{idx}", nxt.levels, nxt.output_quant))
            else:
                out.append(qdq_conv(layer, f"{name}.{idx}", [layer.norm], getattr(layer.norm, "output_quant", None)))
        else:
            out.append(layer)
    return QDQTower(out, readers)


def _factors(alignment) -> Tuple[float, float]:
    """What AQD Eq. 7's aligned add multiplies its two float inputs by (1, 1: a plain add)."""
    return (1.0, 1.0) if alignment is None else (alignment.factor1, alignment.factor2)


class QDQResidualBlock(nn.Module):
    """
    A ResNet block of scope ``aqd`` as exported: its convs (:class:`QDQConv2d`, integer BN
    folded, BN output quantized), the residual add of AQD Eq. 7 — each input multiplied by its
    alignment factor (``c / 2^d`` times the ratio of scales for the larger-scale one, 1 for the
    other), the sum on the add quantizer's grid — then the ReLU.
    """

    def __init__(self, block: nn.Module, factors: Tuple[float, float], add_grid):
        super().__init__()
        self.conv_names = [n for n in ("conv1", "conv2", "conv3") if hasattr(block, n)]  # Basic / Bottleneck
        for n in self.conv_names:
            self.add_module(n, getattr(block, n))
        self.shortcut = block.shortcut
        self.factors = factors
        self.add_grid = add_grid

    def forward(self, x):
        out = x
        for i, n in enumerate(self.conv_names):
            out = self._modules[n](out)
            if i < len(self.conv_names) - 1:
                out = F.relu(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return quantize_dequantize_relu(out * self.factors[0] + shortcut * self.factors[1], self.add_grid)


class QDQInvertedResidual(nn.Module):
    """MobileNetV2's block with a residual, scope ``aqd``, as exported: its convs, then the
    projection and the block's input added as AQD Eq. 7 does (:class:`QDQResidualBlock`), the
    sum on the add quantizer's grid; no activation after it."""

    def __init__(self, block: nn.Module, factors: Tuple[float, float], add_grid):
        super().__init__()
        self.conv = block.conv
        self.factors = factors
        self.add_grid = add_grid

    def forward(self, x):
        return quantize_dequantize(self.conv(x) * self.factors[0] + x * self.factors[1], self.add_grid)


class QDQStem(nn.Module):
    """detectron2's ResNet stem (conv, ReLU, 3x3 max pool) as exported where its conv's output
    is quantized (scope ``aqd``): ReLU and pool on the output integers
    (:func:`~.qdq.quantize_relu_max_pool`), no float op over the largest map of the network."""

    def __init__(self, stem: BasicStem):
        super().__init__()
        self.conv1 = stem.conv1
        self.out_channels, self.stride = stem.out_channels, stem.stride

    def forward(self, x):
        return self.conv1(x, output_op=quantize_relu_max_pool)


class QDQFPN(QFPN):
    """detectron2's FPN of scope ``aqd`` as exported: :class:`QFPN`'s forward with each top-down
    add computed from the alignment factors and grids taken from its quantizers at export."""

    def fuse(self, idx: int, lateral, top_down):
        f_lateral, f_top_down = self.fuse_factors[idx - 1]
        fused = lateral * f_lateral + top_down * f_top_down
        if self._fuse_type == "avg":
            fused = fused / 2
        return quantize_dequantize(fused, self.fuse_grids[idx - 1])


def _block_adds(network, name: str) -> Dict[str, tuple]:
    """``{block name: (alignment factors, add grid)}`` of the quantized residual blocks of a
    QResNet or a QMobileNetV2."""
    names = {id(b): f"{name}.{n}" for n, b in network.named_modules()}
    adds = {}
    for block, input_quant in network.block_inputs():
        if isinstance(block, _QuantAddBlock):
            full = names[id(block)]
            if isinstance(block, QInvertedResidual):  # the linear projection and the input
                last, other = block.conv[-1], input_quant
            else:  # the last conv and the shortcut
                last = block.conv3 if hasattr(block, "conv3") else block.conv2
                other = block.shortcut_quantizer(input_quant)
            alignment = add_alignment(_conv_output_quantizer(last), other) if block.integer_aware else None
            adds[full] = (_factors(alignment), _activation_grid(block.add_quant, f"{full}.add_quant"))
    return adds


def _fpn_adds(fpn: QFPN, name: str) -> tuple:
    """The alignment factors and grids of a QFPN's top-down adds, coarsest first."""
    factors = [
        _factors(add_alignment(_conv_output_quantizer(fpn.lateral_convs[idx]), fpn.top_down_quantizer(idx)))
        if fpn.integer_aware else (1.0, 1.0)
        for idx in range(1, len(fpn.lateral_convs))
    ]
    return factors, [_activation_grid(q, f"{name}.fuse_quants.{i}") for i, q in enumerate(fpn.fuse_quants)]


def _qdq_fpn(fpn: QFPN, factors, grids) -> QDQFPN:
    new = rebuild_as(QDQFPN, fpn)
    del new.fuse_quants
    new.fuse_factors, new.fuse_grids = factors, grids
    return new


def _conv_output_quantizer(conv: nn.Module) -> Optional[Quantizer]:
    return conv.output_quantizer() if isinstance(conv, QConv2d) else None


def _replace(root: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    replace_child(root.get_submodule(parent) if parent else root, child, new)


def _single_reader_pairs(model: nn.Module):
    """``(layer, reader)`` names where ``reader`` alone reads what ``layer`` outputs: neighbours
    in an ``nn.Sequential``; a per-level head's tower and the one predictor that reads it (its
    :func:`~hqod.modeling.dense_head.dense_head_spec`); MobileNetV2's stem and the first conv
    of its first block when the stem is no output feature and the block adds no residual."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Sequential) and not isinstance(module, LevelSequential):
            layers = [child for child, _ in module.named_children()]
            yield from ((prefix + a, prefix + b) for a, b in zip(layers, layers[1:]))
        spec = dense_head_spec(type(module))
        if spec is not None and not spec.shared:
            readers = list(spec.predictors.values())
            for predictor, tower in spec.predictors.items():
                if readers.count(tower) == 1:
                    for level, sequence in enumerate(getattr(module, tower)):
                        layers = [child for child, _ in sequence.named_children()]
                        if layers:  # an empty tower passes the feature on, which others read
                            yield f"{prefix}{tower}.{level}.{layers[-1]}", f"{prefix}{predictor}.{level}"
        if isinstance(module, MobileNetV2) and "stem" not in module.output_shape():
            first = module.stage_names[0]
            if not getattr(module, first)[0].use_residual:
                yield f"{prefix}stem", f"{prefix}{first}.0.conv.0"


def _relu6_readers(model: nn.Module) -> Dict[str, str]:
    """``{conv: reader}``, by name, for the quantized convs whose ReLU6 the export drops: the
    reader alone reads the conv's output (:func:`_single_reader_pairs`: MobileNetV2's expansion
    and depthwise convs under scope ``aqd_star``, its stem, the extra levels', SSD-lite's head
    towers) and quantizes onto a grid with a zero level and no negative level; it then reads onto
    that grid with its top level lowered to the one its quantizer gives 6
    (:meth:`~hqod.quantization.Quantizer.clipped_integer_grid`), which is what ReLU6 followed by
    its grid computes, as the integer engine does. ONNX Runtime removes a ``Clip`` before
    ``QuantizeLinear`` only when the clip covers the whole uint8 domain, ``[0, 255 * scale]``
    (its ``ClipQuantFusion``), which trained 4-bit steps do not meet; the float ReLU6 then kept
    the conv out of ``QLinearConv``."""
    modules = dict(model.named_modules())
    readers = {}
    for conv_name, reader_name in _single_reader_pairs(model):
        conv, reader = modules.get(conv_name), modules.get(reader_name)
        if not (isinstance(conv, QConv2d) and isinstance(reader, QConv2d)):
            continue
        grid = reader.input_quant.integer_grid()
        if (
            isinstance(conv.activation, nn.ReLU6) and conv.output_quantizer() is None
            and grid.offset2 == 0 and grid.eta_min >= 0
        ):
            readers[conv_name] = reader_name
    return readers


def prepare_for_export(model: nn.Module) -> nn.Module:
    """A copy of the detector with every quantized conv (and the BN it is folded with) replaced
    by its Q/DQ form, and under scope ``aqd`` every residual block and the FPN by forms whose
    adds are AQD Eq. 7's; an FP32 detector is copied as it is. Raises :class:`OnnxExportError`
    for what has no ONNX form here (module docstring)."""
    missing = uninitialized_quantizers(model)
    if missing:
        raise OnnxExportError(
            f"{len(missing)} quantizers were never calibrated ({missing[0]}{', ...' if len(missing) > 1 else ''}): "
            "export a trained (or calibrated) quantized model."
        )
    model = copy.deepcopy(model).cpu().eval()
    # the adds' alignments and grids first: they come from the quantizers that the convs hold
    blocks, fpns = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, (QResNet, QMobileNetV2)):
            blocks.update(_block_adds(module, name))
        elif isinstance(module, QFPN):
            fpns[name] = _fpn_adds(module, name)
    for name, module in list(model.named_modules()):
        if isinstance(module, LevelSequential):
            head_name, _, tower_name = name.rpartition(".")
            readers = list(model.get_submodule(head_name).spec.predictors.values()).count(tower_name)
            _replace(model, name, _qdq_tower(module, name, readers))
    relu6_readers = _relu6_readers(model)
    clipped_inputs = set(relu6_readers.values())
    for name, module in list(model.named_modules()):
        if isinstance(module, QConv2d):
            qdq = qdq_conv(
                module, name, [module.norm], getattr(module.norm, "output_quant", None),
                input_upper=6.0 if name in clipped_inputs else None,
            )
            if name in relu6_readers:
                qdq.activation = None
            _replace(model, name, qdq)
    for name, module in list(model.named_modules()):
        if type(module) is BasicStem and isinstance(module.conv1, QDQConv2d) and module.conv1.output_grid is not None:
            _replace(model, name, QDQStem(module))
    for name, (factors, grid) in blocks.items():
        block = model.get_submodule(name)
        export_block = QDQInvertedResidual if isinstance(block, QInvertedResidual) else QDQResidualBlock
        _replace(model, name, export_block(block, factors, grid))
    for name, (factors, grids) in fpns.items():
        _replace(model, name, _qdq_fpn(model.get_submodule(name), factors, grids))
    left = [n for n, m in model.named_modules() if isinstance(m, Quantizer)]
    if left:
        raise OnnxExportError(
            f"Quantizers in layers the exporter does not know: {', '.join(left[:4])}{' ...' if len(left) > 4 else ''}."
        )
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
