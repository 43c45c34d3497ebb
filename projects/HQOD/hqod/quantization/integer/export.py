"""
Conversion of a trained AQD fake-quant detector into the integer network (:func:`to_integer`):
the checks that it is convertible, the export of every quantized conv with its BN and
requantizations, of the adds, the backbones (ResNet + FPN, MobileNetV2 + SSD-lite's extra
levels) and the heads, and :func:`integer_summary`.
"""
import copy
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicStem

from hqod.modeling.dense_head import dense_head_spec
from hqod.modeling.mobilenet import SSDLiteNeck

from ...utils import rebuild_as
from ..integer_layers import INT32_MAX, IntegerGrid, integer_bias_value, integer_bn_params
from ..modules import (
    QBottleneckBlock, QConv2d, QFPN, QInvertedResidual, QMobileNetV2, QResNet, QuantizedModule, _OutputQuantBN, _QuantAddBlock,
    add_alignment,
)
from ..multilevel import LevelSequential, MultiLevelBatchNorm, MultiLevelHead
from ..quantizers import Quantizer
from .network import (
    IntBlock, IntConvChain, IntegerFPN, IntegerHead, IntegerMobileNetV2, IntegerPerLevelHead, IntegerResNet, IntegerSSDLiteNeck,
    IntegerTower, IntInvertedResidual, IntStem,
)
from .ops import IntAdd, IntConv, IntConvUnit, IntegerConversionError, IntLevel, IntQuantizeInput, IntRequant

__all__ = ["to_integer", "integer_summary"]

logger = logging.getLogger(__name__)

_WHAT_TO_USE = (
    "Use an 'aqd' config (quant.method='lq', quant.scope='aqd'; e.g. configs/retina_r18_aqd_w4.py), "
    "fine-tuned with tools/train_net.py, and its checkpoint."
)


def _refuse(kind: str, detail: str = "") -> IntegerConversionError:
    return IntegerConversionError(
        "The integer-only engine needs a fully quantized AQD model (quant.scope='aqd': convs, BN "
        f"outputs, residual and FPN adds on integer grids, integer-aware BN and adds); this model "
        f"is {kind}{': ' + detail if detail else ''}. {_WHAT_TO_USE}"
    )


# ---------------------------------------------------------------------------------------------
# Conversion checks.
# ---------------------------------------------------------------------------------------------
def _check_convertible(model: nn.Module):
    from detectron2.modeling.meta_arch.dense_detector import DenseDetector

    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, Quantizer)}
    if not quantizers:
        raise _refuse("an FP32 model (not quantized)")
    has_bn_quant = any(isinstance(m, _OutputQuantBN) for m in model.modules())
    fp32_layers = [
        n for n, m in model.named_modules()
        if (isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, QuantizedModule))
        or (isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _OutputQuantBN)
            and not _in_multilevel(model, n))
    ]
    if not has_bn_quant:
        raise _refuse("quantized with convs only (AQD*, quant.scope='aqd_star': float BN and float adds)")
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, FPN) and not isinstance(backbone, QFPN):
        raise _refuse("not fully quantized (its FPN adds are float)")
    bottom_up = getattr(backbone, "bottom_up", backbone)
    if not (isinstance(backbone, QFPN) or (type(backbone) is SSDLiteNeck and isinstance(bottom_up, QMobileNetV2))):
        raise _refuse(
            f"built on {type(backbone).__name__} over {type(bottom_up).__name__}",
            "the engine converts ResNet + FPN detectors (RetinaNet, FCOS, ATSS) and MobileNetV2 + SSD-lite",
        )
    if fp32_layers:
        shown = ", ".join(fp32_layers[:8]) + (f" ... ({len(fp32_layers)} in all)" if len(fp32_layers) > 8 else "")
        raise _refuse("partially quantized", f"layers kept FP32 (quant.overrides / first_last_bits=None): {shown}")
    if not isinstance(model, DenseDetector):
        raise _refuse(f"a {type(model).__name__}", "the engine converts dense detectors (RetinaNet, FCOS, ATSS, SSD-lite)")
    bad = [n for n, q in quantizers.items() if not q.is_initialized]
    if bad:
        raise IntegerConversionError(
            f"Quantizers never initialized (no calibration or training): {bad[:5]}... Load a trained "
            "QAT checkpoint (with its quantizer state) before converting."
        )
    off = [n for n, q in quantizers.items() if not q.fake_quant_enabled or q.observer_enabled]
    if off:
        raise IntegerConversionError(
            f"Quantizers with fake quantization off or observing: {off[:5]}...; the model is not in "
            "its quantized state (set_fake_quant(model, True); set_observer(model, False))."
        )


def _in_multilevel(model, name: str) -> bool:
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return isinstance(model.get_submodule(parent), MultiLevelBatchNorm) if parent else False


# ---------------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------------
@dataclass
class _Val:
    """What the exporter knows about an integer tensor: its scale (a float, or one per channel:
    the accumulator of a conv with per-channel weights), a bound of |q| and, after a ReLU6, the
    value its reader clips at (``upper``: 6)."""

    scale: Union[float, torch.Tensor]
    max_abs: int
    upper: Optional[float] = None


def _ratios(scale, step: float) -> List[float]:
    """``scale / step`` as the requantization's list of ratios: one, or one per channel."""
    if isinstance(scale, torch.Tensor):
        return (scale / step).tolist()
    return [scale / step]


class _Exporter:
    def __init__(self, multiplier_bits: int):
        self.multiplier_bits = multiplier_bits
        self.units: List[IntConvUnit] = []
        self.bounds: Dict[str, int] = {}  # largest static integer bound per layer (int32 check)

    def requant(self, ratios, grid: IntegerGrid, max_abs_input: int) -> IntRequant:
        return IntRequant(ratios, grid, max_abs_input=max_abs_input, multiplier_bits=self.multiplier_bits)

    def conv_unit(self, conv: QConv2d, srcs: List[_Val], bns: Optional[List[nn.Module]], name: str) -> IntConvUnit:
        """``conv`` (a QConv2d) fed by ``srcs[level]``, followed by ``bns[level]`` (integer BN +
        output quantizer) or nothing. Returns the unit; its ``out_scale``/``out_max_abs``."""
        if not isinstance(conv, QConv2d) or not conv.integer_aware:
            raise _refuse("not fully quantized", f"{name} is a {type(conv).__name__} without integer-aware quantization")
        in_grid = conv.input_quant.integer_grid()
        w_grid = conv.weight_quant.integer_grid()
        acc_scale = conv.accumulator_step()
        # the integer weights the float32 fake-quant model uses
        w_hat = conv.weight_quant(conv.weight).detach().double()
        w_scale = w_grid.scale.view(-1, 1, 1, 1) if isinstance(w_grid.scale, torch.Tensor) else w_grid.scale
        w_int = torch.round(w_hat / w_scale)
        err = (w_hat / w_scale - w_int).abs().max().item() if w_int.numel() else 0.0
        if err > 1e-3 or w_int.abs().max() > w_grid.max_abs:
            raise IntegerConversionError(f"{name}: weights are not on their quantizer's grid (off by {err:.2g}).")
        bias = integer_bias_value(conv.bias, acc_scale) if conv.bias is not None else None
        norm = conv.norm if bns is None and conv.norm is not None else None
        if norm is not None and not isinstance(norm, _OutputQuantBN):
            raise _refuse("not fully quantized", f"{name}.norm is a float {type(norm).__name__}")
        if bns is None:
            bns = [norm] * len(srcs)
        # the BN of each level (Eq. 5-6): alpha_z and round(s) per channel
        bn_params = []
        for bn in bns:
            if bn is None:
                bn_params.append(None)
                continue
            alpha_z, s_round, _ = integer_bn_params(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, acc_scale)
            if (alpha_z == 0).any():
                raise IntegerConversionError(
                    f"{name}: BN channels with gamma = 0 have no integer scale: "
                    f"{torch.nonzero(alpha_z == 0).flatten().tolist()}."
                )
            bn_params.append((alpha_z, s_round, bn.output_quant))
        shift_bound = max((int(p[1].abs().max()) for p in bn_params if p is not None), default=0)
        iconv = IntConv(w_int, bias, conv, max_abs_input=in_grid.max_abs, extra_bias_bound=shift_bound)
        acc_max = int(iconv.acc_bound.max()) if iconv.acc_bound.numel() else 0
        self._note_bound(name, acc_max)
        levels, out_scale, out_max_abs = [], acc_scale, acc_max
        for src, params in zip(srcs, bn_params):
            # after a ReLU6 the top level is the one the quantizer gives 6: clip and requantize in one
            read_grid = in_grid if src.upper is None else conv.input_quant.clipped_integer_grid(src.upper)
            in_req = self.requant(_ratios(src.scale, in_grid.step), read_grid, src.max_abs)
            if params is None:
                levels.append(IntLevel(in_req, None, None))
                continue
            alpha_z, s_round, out_quant = params
            bound = int((iconv.acc_bound.double() + s_round.abs()).max().item())
            out_grid = out_quant.integer_grid()
            out_req = self.requant((alpha_z / out_grid.step).tolist(), out_grid, bound)
            levels.append(IntLevel(in_req, s_round, out_req))
            self._note_bound(name, bound)
            out_scale, out_max_abs = out_grid.scale, out_grid.max_abs
        unit = IntConvUnit(iconv, levels, acc_scale=acc_scale, out_scale=out_scale, out_max_abs=out_max_abs, name=name)
        self.units.append(unit)
        return unit

    def _note_bound(self, name, bound):
        self.bounds[name] = max(self.bounds.get(name, 0), int(bound))

    def add(self, q1: Quantizer, q2: Quantizer, out_quant: Quantizer, name: str) -> Tuple[IntAdd, _Val]:
        alignment = add_alignment(q1, q2)
        if alignment is None:
            raise _refuse("not fully quantized", f"an input of the add at {name} is not on a quantizer grid")
        g1, g2 = q1.integer_grid(), q2.integer_grid()
        bound = (g1.max_abs << alignment.d) + g2.max_abs * alignment.c if alignment.rescaled == 2 else \
            g1.max_abs * alignment.c + (g2.max_abs << alignment.d)
        grid = out_quant.integer_grid()
        req = self.requant([alignment.out_scale / grid.step], grid, bound)
        self._note_bound(name, bound)
        return IntAdd(alignment.c, alignment.d, alignment.rescaled, req), _Val(grid.scale, grid.max_abs)


def _grid_val(q: Quantizer) -> _Val:
    g = q.integer_grid()
    return _Val(g.scale, g.max_abs)


def _unit_val(unit: IntConvUnit) -> _Val:
    return _Val(unit.out_scale, unit.out_max_abs)


def _export_chain(ex: _Exporter, convs: List[Tuple[str, nn.Module]], src: _Val, entry: Optional[IntQuantizeInput] = None):
    """Quantized convs in sequence, ``(name, conv)``, each with its BN and ReLU, ReLU6 or no
    activation, reading ``src``: ``(IntConvChain, value of its output)``."""
    units, relus, val = [], [], src
    for name, conv in convs:
        unit = ex.conv_unit(conv, [val], None, name)
        activation = getattr(conv, "activation", None)
        if activation is not None and type(activation) not in (nn.ReLU, nn.ReLU6):
            raise _refuse("not convertible", f"{name} applies {type(activation).__name__} (the engine: ReLU, ReLU6)")
        units.append(unit)
        relus.append(activation is not None)
        val = _Val(unit.out_scale, unit.out_max_abs, 6.0 if type(activation) is nn.ReLU6 else None)
    return IntConvChain(units, relus, entry), val


def _children(prefix: str, sequential: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(f"{prefix}.{n}", m) for n, m in sequential.named_children()]


def _export_block(ex: _Exporter, block, input_quant, src: _Val, name: str) -> IntBlock:
    if not isinstance(block, _QuantAddBlock):
        raise _refuse("not fully quantized", f"{name} is a float {type(block).__name__}")
    if not block.integer_aware:
        raise _refuse("not integer-aware", f"{name} adds in float (set_integer_aware(model, True))")
    conv_names = ["conv1", "conv2", "conv3"] if isinstance(block, QBottleneckBlock) else ["conv1", "conv2"]
    units, val = [], src
    for cname in conv_names:
        unit = ex.conv_unit(getattr(block, cname), [val], None, f"{name}.{cname}")
        units.append(unit)
        val = _unit_val(unit)
    last = getattr(block, conv_names[-1])
    if block.shortcut is not None:
        shortcut = ex.conv_unit(block.shortcut, [src], None, f"{name}.shortcut")
        sc_quant = block.shortcut.output_quantizer()
    else:
        shortcut, sc_quant = None, block.shortcut_quantizer(input_quant)
        if sc_quant is None:
            raise _refuse("not fully quantized", f"{name}: the identity shortcut's grid is unknown")
    add, _ = ex.add(last.output_quantizer(), sc_quant, block.add_quant, f"{name}.add")
    return IntBlock(units, shortcut, add)


def _export_fpn(ex: _Exporter, fpn: FPN) -> Tuple[IntegerFPN, Dict[str, _Val]]:
    resnet = fpn.bottom_up
    if not isinstance(resnet, ResNet) or not isinstance(resnet.stem, BasicStem):
        raise _refuse("not convertible", f"the engine supports detectron2 ResNet backbones, not {type(resnet).__name__}")
    if not isinstance(resnet, QResNet):
        raise _refuse("not fully quantized", "the ResNet was not quantized under scope 'aqd'")
    if not fpn.integer_aware:
        raise _refuse("not integer-aware", "the FPN adds in float (set_integer_aware(model, True))")
    if fpn._fuse_type != "sum":
        raise _refuse("not convertible", f"FPN fuse_type={fpn._fuse_type!r} (the engine adds: 'sum')")
    stem_conv = resnet.stem.conv1
    entry_grid = stem_conv.input_quant.integer_grid()
    entry = IntQuantizeInput(entry_grid)
    stem_unit = ex.conv_unit(stem_conv, [_Val(entry_grid.scale, entry_grid.max_abs)], None, "backbone.bottom_up.stem.conv1")
    val = _unit_val(stem_unit)
    stages, bottom_vals = [], {}
    block_inputs = resnet.block_inputs()
    for sname, stage in zip(resnet.stage_names, resnet.stages):
        blocks = []
        for i, (block, input_quant) in enumerate(itertools.islice(block_inputs, len(stage))):
            blocks.append(_export_block(ex, block, input_quant, val, f"backbone.bottom_up.{sname}.{i}"))
            val = _grid_val(block.add_quant)
        stages.append(blocks)
        bottom_vals[sname] = val
    int_resnet = IntegerResNet(resnet, stem=IntStem(entry, stem_unit), stages=stages)
    in_features = list(fpn.in_features)
    name_of = {id(m): f"backbone.{n}" for n, m in fpn.named_children()}
    laterals, outputs, adds = [], [], []
    lat_convs, out_convs = fpn.lateral_convs, fpn.output_convs
    lateral0 = ex.conv_unit(lat_convs[0], [bottom_vals[in_features[-1]]], None, name_of[id(lat_convs[0])])
    laterals.append(lateral0)
    outputs.append(ex.conv_unit(out_convs[0], [_unit_val(lateral0)], None, name_of[id(out_convs[0])]))
    for idx in range(1, len(lat_convs)):
        lat = ex.conv_unit(lat_convs[idx], [bottom_vals[in_features[-idx - 1]]], None, name_of[id(lat_convs[idx])])
        laterals.append(lat)
        add, val = ex.add(
            lat_convs[idx].output_quantizer(), fpn.top_down_quantizer(idx), fpn.fuse_quants[idx - 1],
            f"backbone.fuse_quants.{idx - 1}",
        )
        adds.append(add)
        outputs.append(ex.conv_unit(out_convs[idx], [val], None, name_of[id(out_convs[idx])]))
    names = list(fpn._out_features)
    n_main = len(outputs)
    scales = {n: u.out_scale for n, u in zip(names, reversed(outputs))}
    bounds = {n: u.out_max_abs for n, u in zip(names, reversed(outputs))}
    top = None
    if fpn.top_block is not None:
        tb = fpn.top_block
        if type(tb) is not LastLevelP6P7:
            raise _refuse("not convertible", f"top block {type(tb).__name__} (supported: LastLevelP6P7)")
        if names[n_main:] != ["p6", "p7"]:
            raise _refuse("not convertible", f"unexpected FPN outputs {names}")
        src = bottom_vals.get(tb.in_feature) or _Val(scales[tb.in_feature], bounds[tb.in_feature])
        p6 = ex.conv_unit(tb.p6, [src], None, "backbone.top_block.p6")
        p7 = ex.conv_unit(tb.p7, [_unit_val(p6)], None, "backbone.top_block.p7")
        top = rebuild_as(LastLevelP6P7, tb)  # its forward: p6, then p7 on relu(p6)
        top.p6, top.p7 = p6, p7
        scales.update(p6=p6.out_scale, p7=p7.out_scale)
        bounds.update(p6=p6.out_max_abs, p7=p7.out_max_abs)
    int_fpn = IntegerFPN(
        fpn, bottom_up=int_resnet, laterals=laterals, outputs=outputs, adds=adds, top_block=top,
        feature_scales=scales, feature_max_abs=bounds,
    )
    return int_fpn, {n: _Val(scales[n], bounds[n]) for n in names}


def _export_mobilenet(ex: _Exporter, net: QMobileNetV2, prefix: str) -> Tuple[IntegerMobileNetV2, Dict[str, _Val]]:
    entry_grid = net.stem.input_quant.integer_grid()
    stem, val = _export_chain(
        ex, [(f"{prefix}.stem", net.stem)], _Val(entry_grid.scale, entry_grid.max_abs), IntQuantizeInput(entry_grid)
    )
    vals, stages = {"stem": val}, []
    block_inputs = net.block_inputs()
    for sname in net.stage_names:
        blocks = []
        for i, (block, input_quant) in enumerate(itertools.islice(block_inputs, len(getattr(net, sname)))):
            name = f"{prefix}.{sname}.{i}"
            convs, out = _export_chain(ex, _children(f"{name}.conv", block.conv), val)
            if isinstance(block, QInvertedResidual):
                if not block.integer_aware:
                    raise _refuse("not integer-aware", f"{name} adds in float (set_integer_aware(model, True))")
                if input_quant is None:  # at some widths the first block keeps the stem's width
                    raise _refuse("not fully quantized", f"{name} adds its input, the stem's ReLU6 output, which lies on no grid")
                add, out = ex.add(block.conv[-1].output_quantizer(), input_quant, block.add_quant, f"{name}.add")
                convs = IntInvertedResidual(convs, add)
            elif block.use_residual:
                raise _refuse("not fully quantized", f"{name} adds in float")
            blocks.append(convs)
            val = out
        stages.append(blocks)
        vals[sname] = val
    conv_last, vals["conv_last"] = _export_chain(ex, [(f"{prefix}.conv_last", net.conv_last)], val)
    return IntegerMobileNetV2(net, stem=stem, stages=stages, conv_last=conv_last), vals


def _export_ssdlite_neck(ex: _Exporter, neck: SSDLiteNeck) -> Tuple[IntegerSSDLiteNeck, Dict[str, _Val]]:
    bottom_up, bottom_vals = _export_mobilenet(ex, neck.bottom_up, "backbone.bottom_up")
    vals = {f: bottom_vals[f] for f in neck.in_features}
    val, extras = vals[neck.in_features[-1]], []
    for i, extra in enumerate(neck.extras, start=1):
        chain, val = _export_chain(ex, _children(f"backbone.extras.{i - 1}", extra), val)
        extras.append(chain)
        vals[f"extra{i}"] = val
    int_neck = IntegerSSDLiteNeck(
        neck, bottom_up=bottom_up, extras=extras, feature_scales={f: v.scale for f, v in vals.items()},
        feature_max_abs={f: v.max_abs for f, v in vals.items()},
    )
    return int_neck, vals


def _export_head(ex: _Exporter, head: MultiLevelHead, feature_vals: List[_Val]) -> IntegerHead:
    if not isinstance(head, MultiLevelHead):
        raise _refuse("not convertible", f"head {type(head).__name__} is not a quantized multi-level head")
    towers, tower_vals = {}, {}
    for tname in head.spec.towers:
        tower = getattr(head, tname)
        if not isinstance(tower, LevelSequential):
            raise _refuse("not convertible", f"head.{tname} is a {type(tower).__name__}")
        layers, ops, vals = list(tower), [], list(feature_vals)
        i = 0
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, QConv2d):
                nxt = layers[i + 1] if i + 1 < len(layers) else None
                bns = None
                if isinstance(nxt, MultiLevelBatchNorm):
                    if nxt.output_quant is None:
                        raise _refuse("not fully quantized", f"head.{tname}.{i + 1}: multi-level BN without output quantizer")
                    bns = [_BNView(bn, nxt.output_quant) for bn in nxt.levels]
                    i += 1
                elif isinstance(nxt, nn.modules.batchnorm._BatchNorm):
                    raise _refuse("not fully quantized", f"head.{tname}.{i + 1} is a float BN")
                unit = ex.conv_unit(layer, vals, bns, f"head.{tname}.{i}")
                ops.append(unit)
                vals = [_unit_val(unit)] * len(vals)
            elif isinstance(layer, nn.ReLU):
                ops.append(nn.ReLU())
            else:
                raise _refuse("not convertible", f"head.{tname}.{i} is a {type(layer).__name__}")
            i += 1
        towers[tname], tower_vals[tname] = IntegerTower(*ops), vals
    predictors = {}
    for pname, tname in head.spec.predictors.items():
        predictors[pname] = ex.conv_unit(getattr(head, pname), tower_vals[tname], None, f"head.{pname}")
    return IntegerHead(head, towers=towers, predictors=predictors)


def _export_per_level_head(ex: _Exporter, head: nn.Module, feature_vals: List[_Val]) -> IntegerPerLevelHead:
    """A declared head with its own towers (``nn.Sequential`` of quantized convs with their BN
    and activation) and predictors on each level (``shared=False``, e.g. SSD-lite's)."""
    spec = dense_head_spec(type(head))
    if spec is None or spec.shared:
        raise _refuse("not convertible", f"head {type(head).__name__} is neither a quantized multi-level head nor a per-level dense head")
    towers, tower_vals = {}, {}
    for tname in spec.towers:
        chains, vals = [], []
        for level, (tower, src) in enumerate(zip(getattr(head, tname), feature_vals)):
            chain, val = _export_chain(ex, _children(f"head.{tname}.{level}", tower), src)
            chains.append(chain)
            vals.append(val)
        towers[tname], tower_vals[tname] = chains, vals
    predictors = {
        pname: [
            ex.conv_unit(conv, [val], None, f"head.{pname}.{level}")
            for level, (conv, val) in enumerate(zip(getattr(head, pname), tower_vals[tname]))
        ]
        for pname, tname in spec.predictors.items()
    }
    return IntegerPerLevelHead(head, spec=spec, towers=towers, predictors=predictors)


class _BNView:
    """One level's BN of a multi-level BN with the shared output quantizer."""

    def __init__(self, bn, output_quant):
        self.running_mean, self.running_var = bn.running_mean, bn.running_var
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps
        self.output_quant = output_quant


@torch.no_grad()
def to_integer(model: nn.Module, *, multiplier_bits: int = 31) -> nn.Module:
    """
    Convert a trained AQD detector (fake-quant, ``quant.scope="aqd"``, quantizers initialized)
    into the integer-only model: a copy of ``model`` (same meta-architecture, same detectron2
    post-processing) whose ``backbone`` and ``head`` compute with integers
    (:class:`IntegerFPN` / :class:`IntegerSSDLiteNeck`, :class:`IntegerHead` /
    :class:`IntegerPerLevelHead`), on the CPU (it can be moved to a GPU);
    ``model`` is left as it is.

    Args:
        model: the fake-quant detector (RetinaNet, FCOS, ATSS, SSD-lite or their HQOD
            subclasses).
        multiplier_bits: bits of the requantization multipliers (31: int32).

    Raises:
        IntegerConversionError: the model is FP32, AQD* (``quant.scope="aqd_star"``), keeps
            layers FP32, has uninitialized quantizers or an unsupported structure — the message
            says which and what to use instead.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    _check_convertible(model)
    was_training = model.training
    model.eval()
    try:
        ex = _Exporter(multiplier_bits)
        export_backbone = _export_fpn if isinstance(model.backbone, QFPN) else _export_ssdlite_neck
        backbone, feature_vals = export_backbone(ex, model.backbone)
        vals = [feature_vals[f] for f in model.head_in_features]
        export_head = _export_head if isinstance(model.head, MultiLevelHead) else _export_per_level_head
        head = export_head(ex, model.head, vals)
    finally:
        model.train(was_training)
    memo = {id(model.backbone): backbone, id(model.head): head}
    int_model = copy.deepcopy(model, memo)
    int_model.eval()
    int_model.requires_grad_(False)
    int_model.integer_bounds = dict(ex.bounds)
    # built on the CPU; ``.to("cuda")`` moves it (:meth:`IntConv.forward` stays exact there)
    int_model.to("cpu")
    logger.info(f"to_integer: {len(ex.units)} integer conv units; {integer_summary(int_model)['int32']}")
    return int_model


def integer_summary(int_model: nn.Module) -> Dict[str, object]:
    """Facts about a converted model: units, compute dtypes of the convolutions, the largest
    static accumulator bound and whether every accumulator fits int32."""
    units = [m for m in int_model.modules() if isinstance(m, IntConvUnit)]
    convs = [u.conv for u in units]
    bounds = getattr(int_model, "integer_bounds", {})
    largest_name, largest = max(bounds.items(), key=lambda kv: kv[1]) if bounds else ("", 0)
    return {
        "conv_units": len(units),
        "float32_convs": sum(c.compute_dtype == torch.float32 for c in convs),
        "float64_convs": sum(c.compute_dtype == torch.float64 for c in convs),
        "max_accumulator_bound": largest,
        "max_accumulator_at": largest_name,
        "accumulator_bits": int(math.ceil(math.log2(largest + 1))) + 1 if largest else 0,
        "int32": (
            f"every accumulator fits int32 (largest bound {largest} < 2^31 at {largest_name})"
            if largest <= INT32_MAX else f"accumulator bound {largest} at {largest_name} exceeds int32 (int64 used)"
        ),
        "fits_int32": largest <= INT32_MAX,
    }

