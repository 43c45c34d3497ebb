"""
The integer-only engine (AQD, Chen et al., CVPR 2021, Sec. 3.2): :func:`to_integer` turns a
trained, fully quantized AQD detector (``quant.scope="aqd"``; RetinaNet, FCOS or ATSS on a
detectron2 ResNet + FPN with BN, including the HQOD variants) into a model that computes what
an integer accelerator would:

* integer activations ``q`` on each quantizer's grid (``x_hat = q * alpha``, AQD Eq. 1; the
  zero-free signed grid of Eq. 3 as the odd integers ``2 * eta - (2^b - 1)``);
* convolutions of integer activations and integer weights into int32 accumulators (Eq. 4),
  plus the conv bias as an integer in units of the accumulator step;
* the BN as an integer add of its rounded shift ``round(s)`` to the accumulator (Eq. 5-6, per
  channel and, in the heads, per FPN level); its per-channel scale ``alpha_z`` is carried to
  the requantization that follows;
* requantization onto the next quantizer's grid by an integer multiply and shift
  (``eta = round((q * M + offset * 2^k) / 2^k)``, ``M / 2^k ~ alpha_in / step_out``, int32
  ``M``, 64-bit product as gemmlowp / TFLite, round half to even as the fake quantizers),
  then clipping;
* residual and FPN adds as ``eta_1 * 2^d + eta_2 * c`` (Eq. 7-8, int32 by construction);
* ReLU, max-pooling and nearest upsampling on the integers.

Floats appear only where data enters and leaves the network: the normalized image is quantized
by the stem conv's input quantizer (as the fake-quant model does, in float64), and the
predictors' integer outputs (classification logits, box deltas, centerness) are multiplied by
their scales ``alpha`` when they leave the head. Everything after that is detectron2's normal
post-processing: the converted model is an instance of the same meta-architecture whose
``backbone`` and ``head`` are :class:`IntegerBackbone` / :class:`IntegerHead`.

Exactness. Integers are held in int64 tensors. Convolutions run as float convolutions of
integer-valued tensors (PyTorch has no integer convolution on CPU): float32 where every partial
sum is provably below 2^24 (the static bound ``sum |W| * max|q_in|`` per output channel),
float64 otherwise (below 2^53); both are exact, as every product and partial sum is an integer
representable in the format. On a GPU (whose libraries may use TF32, FFT or Winograd
algorithms) they run in float64 and are rounded: exact as long as the library's error stays
below 1/2, which ``tools/gpu_check.py`` checks against the CPU. The same static bounds (plus the
BN shift) prove that every accumulator fits int32; :func:`integer_summary` reports the largest
one. Requantization products are checked below 2^63 when the multipliers are chosen.

The fake-quant model of scope "aqd" computes the same arithmetic in float (its BN shifts, biases
and add alignments are the same integers, :mod:`.integer_layers`), so the two agree up to float
rounding in the fake-quant model and the 2^-30 relative error of the requantization
multipliers; :mod:`.integer_check` measures it.

Save and load with :func:`save_integer_model` / :func:`load_integer_model`.
"""
import copy
import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicStem

from .integer_layers import (
    INT32_MAX,
    IntegerGrid,
    fixed_point_multiplier,
    integer_bias_value,
    integer_bn_params,
)
from .modules import (
    QBottleneckBlock,
    QConv2d,
    QFPN,
    QuantizedModule,
    _OutputQuantBN,
    _QuantAddBlock,
    add_alignment,
)
from .multilevel import LevelSequential, MultiLevelBatchNorm, MultiLevelHead
from .quantizers import Quantizer

__all__ = [
    "IntegerConversionError",
    "to_integer",
    "save_integer_model",
    "load_integer_model",
    "integer_summary",
    "IntegerBackbone",
    "IntegerHead",
    "IntRequant",
    "IntConv",
    "IntConvUnit",
    "IntAdd",
]

logger = logging.getLogger(__name__)

INTEGER_FORMAT = "hqod-integer-detector"
INTEGER_FORMAT_VERSION = 1
_F32_EXACT = 2**24
_F64_EXACT = 2**53


class IntegerConversionError(ValueError):
    """The model cannot be converted to integer arithmetic; the message says what to use."""


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
# Integer building blocks.
# ---------------------------------------------------------------------------------------------
def _channel_view(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


class IntRequant(nn.Module):
    """
    Requantize integers ``q`` of scale ``alpha_in`` (per tensor or per channel) onto a
    quantizer's grid: ``eta = clip(round(q * alpha_in / step + offset), eta_min, eta_max)``,
    ``q_out = m * eta - m * offset`` (:class:`~.integer_layers.IntegerGrid`), with
    ``alpha_in / step ~ M / 2^k`` (:func:`~.integer_layers.fixed_point_multiplier`, per
    channel) — integer multiply, add, shifts only. With ``n = 2 q M + offset2 * 2^k`` (the value
    times ``2^s``, ``s = k + 1``), round half to even is
    ``eta = (n + 2^(s-1) - 1 + ((n >> s) & 1)) >> s``.
    """

    def __init__(self, ratios: Sequence[float], grid: IntegerGrid, *, max_abs_input: int, multiplier_bits: int = 31):
        super().__init__()
        mults, shifts = zip(
            *(
                fixed_point_multiplier(r, max_abs_input=max_abs_input, offset2=grid.offset2, bits=multiplier_bits)
                for r in ratios
            )
        )
        self.register_buffer("multiplier", torch.tensor(mults, dtype=torch.int64))
        self.register_buffer("shift", torch.tensor(shifts, dtype=torch.int64))
        self.eta_min, self.eta_max = grid.eta_min, grid.eta_max
        self.offset2, self.m, self.q_offset = grid.offset2, grid.m, grid.q_offset
        self.max_abs_input = int(max_abs_input)
        k = [int(v) for v in shifts]
        # 2M, the constant offset2 * 2^k + 2^k - 1, and s = k + 1, per channel (view 1, C, 1, 1)
        self.register_buffer("_m2", _channel_view(self.multiplier * 2).clone(), persistent=False)
        const = torch.tensor([self.offset2 * 2**kk + 2**kk - 1 for kk in k], dtype=torch.int64)
        self.register_buffer("_const", _channel_view(const).clone(), persistent=False)
        self._s = k[0] + 1 if len(set(k)) == 1 else None  # one shift: a Python int is faster
        self.register_buffer("_s_t", _channel_view(self.shift + 1).clone(), persistent=False)

    def forward(self, q: Tensor) -> Tensor:
        n = q * self._m2
        n += self._const
        s = self._s if self._s is not None else self._s_t
        parity = torch.bitwise_right_shift(n, s)
        parity.bitwise_and_(1)
        n += parity  # + 1 only on ties whose floor is odd: round half to even
        eta = torch.bitwise_right_shift(n, s, out=n)
        eta.clamp_(self.eta_min, self.eta_max)
        if self.m != 1:
            eta.mul_(self.m)
        if self.q_offset:
            eta.sub_(self.q_offset)
        return eta

    def extra_repr(self):
        return (
            f"channels={self.multiplier.numel()}, eta=[{self.eta_min}, {self.eta_max}], m={self.m}, "
            f"q_offset={self.q_offset}, shifts=[{int(self.shift.min())}, {int(self.shift.max())}]"
        )


class IntConv(nn.Module):
    """
    An integer convolution: int32 accumulators ``sum W * q`` plus an integer bias (units of the
    accumulator step) and, when given, the BN's integer shift. Computed as a float convolution of
    integer-valued tensors in ``compute_dtype`` — float32 where the static bound of every partial
    sum (and the biases) is below 2^24, else float64 (below 2^53) — and exact either way; the
    integer biases are added by the convolution itself when that keeps it exact.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], conv: nn.Conv2d, *, max_abs_input: int, extra_bias_bound: int = 0):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.int32))
        self.register_buffer("bias", None if bias is None else bias.to(torch.int64))
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        w_abs = weight.abs().double().flatten(1).sum(1)
        self.max_abs_input = int(max_abs_input)
        bound = w_abs * max_abs_input
        bias_abs = bias.abs().double() if bias is not None else torch.zeros_like(w_abs)
        self.register_buffer("acc_bound", (bound + bias_abs).round().to(torch.int64), persistent=False)
        total = int(self.acc_bound.max().item()) + int(extra_bias_bound) if bound.numel() else 0
        if total >= _F64_EXACT:
            raise IntegerConversionError(f"accumulator bound {total} is beyond 2^53.")
        self.compute_dtype = torch.float32 if total < _F32_EXACT else torch.float64
        self._wf = None

    def forward(self, q: Tensor, extra_bias: Optional[Tensor] = None) -> Tensor:
        """``extra_bias``: an int64 (C,) tensor added to the accumulator (the BN shift)."""
        on_cpu = q.device.type == "cpu"
        # Off the CPU, GPU libraries may pick TF32, FFT or Winograd algorithms, exact for none
        # of them: float64 keeps their error far below 1/2, and the result is rounded.
        dtype = self.compute_dtype if on_cpu else torch.float64
        if self._wf is None or self._wf.device != q.device or self._wf.dtype != dtype:
            self._wf = self.weight.to(q.device, dtype)
        bias = self.bias
        if extra_bias is not None:
            bias = extra_bias if bias is None else bias + extra_bias
        fbias = None if bias is None else bias.to(dtype)  # exact: |bias| < 2^24 / 2^53
        y = F.conv2d(q.to(dtype), self._wf, fbias, self.stride, self.padding, self.dilation, self.groups)
        return (y if on_cpu else y.round_()).to(torch.int64)

    def _apply(self, fn, *args, **kwargs):
        self._wf = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # the float copy of the weights is a cache, not state
        state = self.__dict__.copy()
        state["_wf"] = None
        return state

    def extra_repr(self):
        return (
            f"{tuple(self.weight.shape)}, stride={self.stride}, padding={self.padding}, "
            f"bias={self.bias is not None}, compute={str(self.compute_dtype).replace('torch.', '')}, "
            f"acc_bound={int(self.acc_bound.max()) if self.acc_bound.numel() else 0}"
        )


class IntLevel(nn.Module):
    """What an :class:`IntConvUnit` does on one FPN level (or its only level): requantize the
    input onto the conv's input grid, add the BN's integer shift, requantize the accumulator onto
    the BN output quantizer's grid."""

    def __init__(self, in_requant: Optional[IntRequant], bn_shift: Optional[Tensor], out_requant: Optional[IntRequant]):
        super().__init__()
        self.in_requant = in_requant
        self.register_buffer("bn_shift", None if bn_shift is None else bn_shift.to(torch.int64))
        self.out_requant = out_requant


class IntConvUnit(nn.Module):
    """
    A quantized conv with what follows it up to the next integer grid:
    ``in_requant -> conv (+ integer bias) -> + BN shift (Eq. 6) -> out_requant``. Multi-level
    heads share the conv and keep one :class:`IntLevel` per FPN level.

    Attributes (export-time facts): ``acc_scale`` (alpha_conv), ``out_scale`` and
    ``out_max_abs`` (the output's scale and integer bound: the BN output quantizer's grid, or the
    accumulator's when there is no BN).
    """

    def __init__(self, conv: IntConv, levels: List[IntLevel], *, acc_scale: float, out_scale: float, out_max_abs: int, name: str = ""):
        super().__init__()
        self.conv = conv
        self.levels = nn.ModuleList(levels)
        self.acc_scale, self.out_scale, self.out_max_abs = acc_scale, out_scale, int(out_max_abs)
        self.name = name

    def forward(self, q: Tensor, level: int = 0) -> Tensor:
        lv = self.levels[level]
        if lv.in_requant is not None:
            q = lv.in_requant(q)
        acc = self.conv(q, lv.bn_shift)  # integer BN (Eq. 6): eta_conv + round(s), in the accumulator
        if lv.out_requant is not None:
            acc = lv.out_requant(acc)
        return acc

    def extra_repr(self):
        return f"name={self.name!r}, acc_scale={self.acc_scale:.4g}, out_scale={self.out_scale:.4g}"


class IntAdd(nn.Module):
    """AQD Eq. 7: ``S = eta_1 * 2^d + eta_2 * c`` (or ``eta_1 * c + eta_2 * 2^d``), then
    requantized onto the add quantizer's grid."""

    def __init__(self, c: int, d: int, rescaled: int, requant: IntRequant):
        super().__init__()
        self.c, self.d, self.rescaled = int(c), int(d), int(rescaled)
        self.requant = requant

    def forward(self, q1: Tensor, q2: Tensor) -> Tensor:
        if self.rescaled == 2:
            s = torch.bitwise_left_shift(q1, self.d).add_(q2 * self.c)
        else:
            s = (q1 * self.c).add_(torch.bitwise_left_shift(q2, self.d))
        return self.requant(s)

    def extra_repr(self):
        return f"c={self.c}, d={self.d}, rescaled=input{self.rescaled}"


def _relu(q: Tensor) -> Tensor:
    return q.clamp_min(0)


def _relu_(q: Tensor) -> Tensor:
    return q.clamp_min_(0)


def _max_pool(q: Tensor, **kwargs) -> Tensor:
    return F.max_pool2d(q.to(torch.float32), **kwargs).to(torch.int64)  # exact: |q| < 2^24


def _upsample2(q: Tensor) -> Tensor:
    return q.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest, x2


class IntQuantizeInput(nn.Module):
    """Where data enters: the stem conv's input quantizer applied to the normalized image (float64
    ``round(x / step + offset)``, clip), giving the integers ``q``."""

    def __init__(self, grid: IntegerGrid):
        super().__init__()
        self.step, self.offset = float(grid.step), grid.offset2 / 2
        self.eta_min, self.eta_max, self.m, self.q_offset = grid.eta_min, grid.eta_max, grid.m, grid.q_offset

    def forward(self, x: Tensor) -> Tensor:
        eta = torch.round(x.to(torch.float64) / self.step + self.offset).clamp_(self.eta_min, self.eta_max)
        return (eta * self.m - self.q_offset).to(torch.int64)


class IntStem(nn.Module):
    def __init__(self, entry: IntQuantizeInput, unit: IntConvUnit):
        super().__init__()
        self.entry, self.unit = entry, unit

    def forward(self, x: Tensor) -> Tensor:
        q = _relu_(self.unit(self.entry(x)))
        return _max_pool(q, kernel_size=3, stride=2, padding=1)


class IntBlock(nn.Module):
    """A ResNet basic or bottleneck block: convs (ReLU between), shortcut (conv or identity),
    the Eq. 7 add, ReLU."""

    def __init__(self, convs: List[IntConvUnit], shortcut: Optional[IntConvUnit], add: IntAdd):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.shortcut = shortcut
        self.add = add

    def forward(self, q: Tensor) -> Tensor:
        out = q
        for i, unit in enumerate(self.convs):
            out = unit(out)
            if i < len(self.convs) - 1:
                out = _relu_(out)
        sc = self.shortcut(q) if self.shortcut is not None else q
        return _relu_(self.add(out, sc))


class IntegerBackbone(nn.Module):
    """
    detectron2's ResNet + FPN (+ P6/P7) in integers: ``forward(image)`` takes the normalized
    float image and returns ``{name: int64 tensor}``; ``feature_scales[name]`` and
    ``feature_max_abs[name]`` are the scales and integer bounds of those features.
    """

    def __init__(self, *, stem, stages, stage_names, bottom_up_out, in_features, laterals, outputs, adds,
                 top_block, top_block_in, out_features, feature_scales, feature_max_abs,
                 size_divisibility, padding_constraints, output_shapes):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.stage_names = list(stage_names)
        self.bottom_up_out = list(bottom_up_out)
        self.in_features = list(in_features)
        self.laterals = nn.ModuleList(laterals)
        self.outputs = nn.ModuleList(outputs)
        self.adds = nn.ModuleList(adds)
        self.top_block = top_block
        self.top_block_in = top_block_in
        self.out_features = list(out_features)
        self.feature_scales = dict(feature_scales)
        self.feature_max_abs = dict(feature_max_abs)
        self._size_divisibility = size_divisibility
        self._padding_constraints = dict(padding_constraints or {})
        self._output_shapes = dict(output_shapes)

    @property
    def size_divisibility(self):
        return self._size_divisibility

    @property
    def padding_constraints(self):
        return self._padding_constraints

    def output_shape(self):
        return dict(self._output_shapes)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        if self.training:
            raise RuntimeError("The integer-only model is for inference: call .eval().")
        q = self.stem(x)
        bottom_up = {}
        for name, stage in zip(self.stage_names, self.stages):
            q = stage(q)
            if name in self.bottom_up_out:
                bottom_up[name] = q
        results = []
        prev = self.laterals[0](bottom_up[self.in_features[-1]])
        results.append(self.outputs[0](prev))
        for idx in range(1, len(self.laterals)):
            lateral = self.laterals[idx](bottom_up[self.in_features[-idx - 1]])
            prev = self.adds[idx - 1](lateral, _upsample2(prev))
            results.insert(0, self.outputs[idx](prev))
        out = dict(zip(self.out_features, results))
        if self.top_block is not None:
            src = bottom_up[self.top_block_in] if self.top_block_in in bottom_up else out[self.top_block_in]
            p6 = self.top_block.p6(src)
            out["p6"] = p6
            out["p7"] = self.top_block.p7(_relu(p6))
        return {name: out[name] for name in self.out_features + (["p6", "p7"] if self.top_block is not None else [])}


class IntTopBlock(nn.Module):
    def __init__(self, p6: IntConvUnit, p7: IntConvUnit):
        super().__init__()
        self.p6, self.p7 = p6, p7


class IntegerHead(nn.Module):
    """
    A multi-level head in integers: per FPN level, the towers (conv, integer BN of that level,
    requantization, ReLU) and the predictors, whose int32 outputs leave the network multiplied by
    their scales (``output_scales``, float) — the only float multiply of the head. Returns the
    float head's structure (one list per output, one tensor per level).
    """

    def __init__(self, towers: Dict[str, List[nn.Module]], predictors: Dict[str, IntConvUnit], predictor_inputs: Dict[str, str]):
        super().__init__()
        self.towers = nn.ModuleDict({k: nn.ModuleList(v) for k, v in towers.items()})
        self.predictors = nn.ModuleDict(predictors)
        self.predictor_inputs = dict(predictor_inputs)
        self.output_names = list(predictor_inputs)
        self.output_scales = [predictors[k].acc_scale for k in self.output_names]

    def forward_integer(self, features: List[Tensor]) -> List[List[Tensor]]:
        """The predictors' integer outputs (int64), per output and level."""
        outs = {k: [] for k in self.output_names}
        for level, feature in enumerate(features):
            tower_out = {}
            for name, tower in self.towers.items():
                q = feature
                for op in tower:
                    if isinstance(op, IntConvUnit):
                        q = op(q, level)
                    else:
                        q = _relu(q) if q is feature else _relu_(q)
                tower_out[name] = q
            for k in self.output_names:
                outs[k].append(self.predictors[k](tower_out[self.predictor_inputs[k]], level))
        return [outs[k] for k in self.output_names]

    def forward(self, features: List[Tensor]):
        if self.training:
            raise RuntimeError("The integer-only model is for inference: call .eval().")
        outs = self.forward_integer(features)
        # where the outputs leave the network: the per-output scale alpha_conv, applied once
        return tuple(
            [(q.to(torch.float64) * scale).to(torch.float32) for q in per_level]
            for per_level, scale in zip(outs, self.output_scales)
        )


class _IntReLU(nn.Module):
    def forward(self, q, level=0):
        return _relu_(q)


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
    if not has_bn_quant or not isinstance(getattr(model, "backbone", None), QFPN):
        raise _refuse(
            "quantized with convs only (AQD*, quant.scope='aqd_star': float BN and float adds)"
            if not has_bn_quant else "not fully quantized (its FPN adds are float)"
        )
    if fp32_layers:
        shown = ", ".join(fp32_layers[:8]) + (f" ... ({len(fp32_layers)} in all)" if len(fp32_layers) > 8 else "")
        raise _refuse("partially quantized", f"layers kept FP32 (quant.overrides / first_last_bits=None): {shown}")
    if not isinstance(model, DenseDetector):
        raise _refuse(f"a {type(model).__name__}", "the engine converts dense detectors (RetinaNet, FCOS, ATSS)")
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
    """What the exporter knows about an integer tensor: its scale and a bound of |q|."""

    scale: float
    max_abs: int


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
        w_int = torch.round(w_hat / w_grid.scale)
        err = (w_hat / w_grid.scale - w_int).abs().max().item() if w_int.numel() else 0.0
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
            in_req = self.requant([src.scale / in_grid.step], in_grid, src.max_abs)
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


def _export_block(ex: _Exporter, block, src: _Val, name: str) -> IntBlock:
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
        shortcut, sc_quant = None, block.input_grid_quant
        if sc_quant is None:
            raise _refuse("not fully quantized", f"{name}: the identity shortcut's grid is unknown")
    add, _ = ex.add(last.output_quantizer(), sc_quant, block.add_quant, f"{name}.add")
    return IntBlock(units, shortcut, add)


def _export_backbone(ex: _Exporter, fpn: FPN) -> IntegerBackbone:
    resnet = fpn.bottom_up
    if not isinstance(resnet, ResNet) or not isinstance(resnet.stem, BasicStem):
        raise _refuse("not convertible", f"the engine supports detectron2 ResNet backbones, not {type(resnet).__name__}")
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
    for sname, stage in zip(resnet.stage_names, resnet.stages):
        blocks = []
        for i, block in enumerate(stage):
            blocks.append(_export_block(ex, block, val, f"backbone.bottom_up.{sname}.{i}"))
            val = _grid_val(block.add_quant)
        stages.append(nn.Sequential(*blocks))
        bottom_vals[sname] = val
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
    main_names = names[:n_main]
    scales = {n: u.out_scale for n, u in zip(main_names, reversed(outputs))}
    bounds = {n: u.out_max_abs for n, u in zip(main_names, reversed(outputs))}
    top, top_in = None, None
    if fpn.top_block is not None:
        tb = fpn.top_block
        if not isinstance(tb, LastLevelP6P7):
            raise _refuse("not convertible", f"top block {type(tb).__name__} (supported: LastLevelP6P7)")
        top_in = tb.in_feature
        src = bottom_vals.get(top_in) or _Val(scales[top_in], bounds[top_in])
        p6 = ex.conv_unit(tb.p6, [src], None, "backbone.top_block.p6")
        p7 = ex.conv_unit(tb.p7, [_unit_val(p6)], None, "backbone.top_block.p7")
        top = IntTopBlock(p6, p7)
        scales.update(p6=p6.out_scale, p7=p7.out_scale)
        bounds.update(p6=p6.out_max_abs, p7=p7.out_max_abs)
        if names[n_main:] != ["p6", "p7"]:
            raise _refuse("not convertible", f"unexpected FPN outputs {names}")
    return IntegerBackbone(
        stem=IntStem(entry, stem_unit), stages=stages, stage_names=resnet.stage_names,
        bottom_up_out=list(bottom_vals), in_features=in_features, laterals=laterals, outputs=outputs,
        adds=adds, top_block=top, top_block_in=top_in, out_features=main_names,
        feature_scales=scales, feature_max_abs=bounds,
        size_divisibility=fpn.size_divisibility,
        padding_constraints=getattr(fpn, "padding_constraints", {}),
        output_shapes=fpn.output_shape(),
    )


def _export_head(ex: _Exporter, head: MultiLevelHead, feature_vals: List[_Val]) -> IntegerHead:
    if not isinstance(head, MultiLevelHead):
        raise _refuse("not convertible", f"head {type(head).__name__} is not a quantized multi-level head")
    towers, tower_vals = {}, {}
    for tname in sorted(set(head.predictor_inputs.values())):
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
                    if not (nxt.integer_aware and nxt.output_quant is not None):
                        raise _refuse("not fully quantized", f"head.{tname}.{i + 1}: multi-level BN without output quantizer")
                    bns = [_BNView(bn, nxt.output_quant) for bn in nxt.levels]
                    i += 1
                elif isinstance(nxt, nn.modules.batchnorm._BatchNorm):
                    raise _refuse("not fully quantized", f"head.{tname}.{i + 1} is a float BN")
                unit = ex.conv_unit(layer, vals, bns, f"head.{tname}.{i}")
                ops.append(unit)
                vals = [_unit_val(unit)] * len(vals)
            elif isinstance(layer, nn.ReLU):
                ops.append(_IntReLU())
            else:
                raise _refuse("not convertible", f"head.{tname}.{i} is a {type(layer).__name__}")
            i += 1
        towers[tname], tower_vals[tname] = ops, vals
    predictors = {}
    for pname, tname in head.predictor_inputs.items():
        predictors[pname] = ex.conv_unit(getattr(head, pname), tower_vals[tname], None, f"head.{pname}")
    return IntegerHead(towers, predictors, head.predictor_inputs)


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
    (:class:`IntegerBackbone`, :class:`IntegerHead`), on the CPU (it can be moved to a GPU);
    ``model`` is left as it is.

    Args:
        model: the fake-quant detector (RetinaNet, FCOS, ATSS or their HQOD subclasses).
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
        backbone = _export_backbone(ex, model.backbone)
        vals = [_Val(backbone.feature_scales[f], backbone.feature_max_abs[f]) for f in model.head_in_features]
        head = _export_head(ex, model.head, vals)
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


# ---------------------------------------------------------------------------------------------
# Save / load.
# ---------------------------------------------------------------------------------------------
def save_integer_model(int_model: nn.Module, path: str, **metadata) -> None:
    """Save a model from :func:`to_integer` (the whole module: integer weights, biases, BN shifts,
    multipliers and shifts, plus the meta-architecture's post-processing settings) with
    ``metadata``; :func:`load_integer_model` reads it back."""
    if not any(isinstance(m, IntegerHead) for m in int_model.modules()):
        raise ValueError("save_integer_model: not a model from to_integer().")
    torch.save(
        {"format": INTEGER_FORMAT, "version": INTEGER_FORMAT_VERSION, "model": int_model, "metadata": metadata},
        path,
    )


def load_integer_model(path: str, map_location="cpu") -> nn.Module:
    """Load a model saved by :func:`save_integer_model` (pickled module: needs hqod and
    detectron2 importable); returns it in eval mode with ``.metadata``.

    The file is read as data (``torch.load(weights_only=True)``) allowing only nn.Module classes
    of torch.nn, detectron2 and hqod and the plain objects detectors hold
    (:func:`~hqod.quantization.checkpoint.integer_model_globals`): a file holding anything else
    is refused with a ValueError naming it, unless the environment variable
    ``HQOD_TRUST_CHECKPOINTS=1`` (full unpickling, with a warning)."""
    from .checkpoint import integer_model_globals, load_torch_file

    obj = load_torch_file(path, integer_model_globals(), map_location=map_location)
    if not isinstance(obj, dict) or obj.get("format") != INTEGER_FORMAT:
        raise ValueError(f"{path} is not an integer model saved by save_integer_model().")
    if obj.get("version") != INTEGER_FORMAT_VERSION:
        raise ValueError(f"{path}: integer model format version {obj.get('version')}, expected {INTEGER_FORMAT_VERSION}.")
    model = obj["model"]
    model.metadata = obj.get("metadata", {})
    return model.eval()
