"""
The quantized convolution as ONNX Runtime runs it: ``QuantizeLinear``/``DequantizeLinear``
(Q/DQ) pairs that its graph optimizer fuses into integer kernels (``QLinearConv``).

:class:`QDQConv2d` is the exported form of a quantized conv of the fake-quant model (a
:class:`~hqod.quantization.QConv2d` of scope ``aqd_star``) with the BN that follows it folded in:

* input: ``x_hat = clip(round(x / alpha_x), q_min, q_max) * alpha_x`` — ``QuantizeLinear`` to
  uint8 (zero point 0, or 128 for a signed grid), a ``Clip`` of the integers when the grid is
  narrower than 8 bits, ``DequantizeLinear``: the quantizer's own grid;
* weight: the integers ``q_w`` of the weight quantizer's grid (times an integer ``k`` per output
  channel, see below) in an int8 initializer, ``DequantizeLinear`` with one scale per output
  channel, ``alpha_w / k * gamma / sigma`` (the BN's multiplier folded into the scale: the
  weights are exactly those QAT trained, AQD Eq. 4);
* bias: the conv bias and the BN's shift, ``(b - mu) * gamma / sigma + beta``, rounded to an
  int32 in units of the accumulator step ``alpha_x * alpha_w / k * gamma / sigma`` (what
  ``QLinearConv`` adds to its int32 accumulator). ``k`` is the largest that keeps ``q_w * k`` in
  int8, so that this unit is fine enough for a BN shift at 2-4 bits
  (:func:`~.export._refine_weight_units`);
* in a head shared over FPN levels with one BN per level (AQD's multi-level BN) the weight
  integers are shared and the scales and biases are per level (:meth:`QDQConv2d.forward` takes
  the level).

Run in PyTorch the module computes the same values in float (the reference the tests compare
ONNX Runtime with); traced by ``torch.onnx.export`` the autograd functions below emit the Q/DQ
nodes (their ``symbolic``).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QDQConv2d", "quantize_dequantize", "quantize_dequantize_relu", "quantize_relu_max_pool", "dequantize", "fits_uint8", "uint8_max", "INT16_PAIR_LIMIT"]


def _const(g, value, dtype=torch.float32):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _q_dq(g, x, scale: float, q_min: int, q_max: int):
    """QuantizeLinear, a Clip of the integers when the range is narrower than 8 bits,
    DequantizeLinear; uint8, with the zero point 128 for a signed range."""
    zero_point = 0 if q_min >= 0 else 128
    scale_node, zero = _const(g, scale), _const(g, zero_point, torch.uint8)
    q = g.op("QuantizeLinear", x, scale_node, zero)
    low, high = q_min + zero_point, q_max + zero_point
    if (low, high) != (0, 255):
        q = g.op("Clip", q, _const(g, low, torch.uint8), _const(g, high, torch.uint8))
    return g.op("DequantizeLinear", q, scale_node, zero)


def fits_uint8(q_min: int, q_max: int) -> bool:
    """Whether the integers ``[q_min, q_max]`` fit uint8 (zero point 0) or, shifted by the zero
    point 128, a signed range."""
    return 0 <= q_min <= q_max <= 255 or -128 <= q_min <= q_max <= 127


class _QuantizeDequantize(torch.autograd.Function):
    """
    ``(clip(round(x / step + offset), eta_min, eta_max) - offset) * step``, the fake quantizers'
    grid (:class:`~hqod.quantization.IntegerGrid`, ``offset = offset2 / 2``). ONNX:

    * integer offset (LSQ, TQT, unsigned LQ): ``QuantizeLinear``, a ``Clip`` of the integers for
      2..7 bits, ``DequantizeLinear`` — uint8, a signed grid with the zero point 128 (the same
      values; ONNX Runtime's x86 integer kernels take uint8 activations);
    * half-integer offset (AQD Eq. 3's signed grid without a zero level, whose levels
      ``q * step / 2`` with odd ``q`` ``QuantizeLinear`` cannot round to): the same rounding as
      float ops, then, where the odd integers fit 8 bits (up to 7 bits), a ``QuantizeLinear`` /
      ``DequantizeLinear`` pair on the grid of step / 2 (exact on those values) so that the next
      conv still reads integers.
    """

    @staticmethod
    def forward(ctx, x, step: float, eta_min: int, eta_max: int, offset2: int):
        offset = offset2 / 2
        return (torch.clamp(torch.round(x / step + offset), eta_min, eta_max) - offset) * step

    @staticmethod
    def symbolic(g, x, step: float, eta_min: int, eta_max: int, offset2: int):
        if offset2 % 2 == 0:
            offset = offset2 // 2
            return _q_dq(g, x, step, eta_min - offset, eta_max - offset)
        offset = offset2 / 2
        eta = g.op("Round", g.op("Add", g.op("Div", x, _const(g, step)), _const(g, offset)))
        eta = g.op("Clip", eta, _const(g, float(eta_min)), _const(g, float(eta_max)))
        x_hat = g.op("Mul", g.op("Sub", eta, _const(g, offset)), _const(g, step))
        q_min, q_max = 2 * eta_min - offset2, 2 * eta_max - offset2
        return _q_dq(g, x_hat, step / 2, q_min, q_max) if fits_uint8(q_min, q_max) else x_hat


def quantize_dequantize(x: torch.Tensor, grid) -> torch.Tensor:
    """``x`` on the grid of a quantizer (its :class:`~hqod.quantization.IntegerGrid`, per
    tensor; the exporter checks that it fits 8 bits), rounding half to even as the fake
    quantizers and ``QuantizeLinear`` do."""
    return _QuantizeDequantize.apply(x, float(grid.step), int(grid.eta_min), int(grid.eta_max), int(grid.offset2))


def quantize_dequantize_relu(x: torch.Tensor, grid) -> torch.Tensor:
    """``relu(quantize_dequantize(x, grid))``. On a grid with a zero level the ReLU is the clip
    of the integers raised to that level: the same values, exported as one Q/DQ pair with
    unsigned integers (``QuantizeLinear``, ``Clip`` on uint8, ``DequantizeLinear``) instead of a
    float ``Relu`` over the dequantized map (about 9 % of the int8 model's time at the COCO
    size). A grid without a zero level (AQD's signed LQ grid) keeps the float ``Relu``."""
    if grid.offset2 % 2:
        return F.relu(quantize_dequantize(x, grid))
    offset = grid.offset2 // 2
    return _QuantizeDequantize.apply(x, float(grid.step), max(int(grid.eta_min), offset), int(grid.eta_max), int(grid.offset2))


def quantize_relu_max_pool(x: torch.Tensor, grid) -> torch.Tensor:
    """``max_pool2d(relu(quantize_dequantize(x, grid)), 3, 2, 1)``, the ResNet stem after its
    conv. The pool of grid values is on the grid, so quantizing it again changes no value; in
    ONNX that pair around ``MaxPool``, of the same scale and zero point, is what ONNX Runtime
    drops to pool the uint8 integers themselves (and the ReLU is a clip of them,
    :func:`quantize_dequantize_relu`). On a grid without a zero level (LQ), whose ReLU puts
    zeros off the grid, the pool stays on the dequantized values."""
    pooled = F.max_pool2d(quantize_dequantize_relu(x, grid), kernel_size=3, stride=2, padding=1)
    return quantize_dequantize_relu(pooled, grid) if grid.offset2 % 2 == 0 else pooled


class _Dequantize(torch.autograd.Function):
    """``(q - zero_point) * scale`` with one scale (and zero point) per index of dim 0; ONNX:
    DequantizeLinear(axis=0)."""

    @staticmethod
    def forward(ctx, q, scale, zero_point):
        shape = (-1,) + (1,) * (q.dim() - 1)
        values = q.to(scale.dtype)
        if zero_point is not None:
            values = values - zero_point.to(scale.dtype).view(shape)
        return values * scale.view(shape)

    @staticmethod
    def symbolic(g, q, scale, zero_point):
        if zero_point is None:
            return g.op("DequantizeLinear", q, scale, axis_i=0)
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=0)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The integer tensor ``q`` (int8 or uint8 weights, int32 biases) minus its zero point (per
    output channel, None: 0) times its per-output-channel ``scale`` (float32)."""
    return _Dequantize.apply(q, scale, zero_point)


#: x86 int8 kernels without VNNI add pairs of uint8 x int8 products in int16 (vpmaddubsw): a conv
#: is exact there only if 2 * (largest uint8 input) * (largest |int8 weight|) stays below this.
INT16_PAIR_LIMIT = 2**15 - 1


def uint8_max(grid) -> int:
    """The largest uint8 value a Q/DQ activation on ``grid`` takes (zero point 128 if signed)."""
    return grid.q_max + (0 if grid.q_min >= 0 else 128)


class QDQConv2d(nn.Module):
    """
    A quantized conv (+ folded BN, + activation) as Q/DQ (module docstring). ``input_grid``: the
    input quantizer's :class:`~hqod.quantization.IntegerGrid`; ``output_grid``: the grid of the
    folded BN's output quantizer (scope ``aqd``), or None. Buffers: ``weight_int`` (int8,
    the conv's weight shape), ``weight_scale`` (float32, levels x C_out), ``bias_int`` (int32,
    levels x C_out), ``bias_scale`` (float32, levels x C_out, ``alpha_x * weight_scale``).
    Weight integers that do not fit int8 (an 8-bit grid without a zero level: 9 bits) are held
    as float weights instead (``weight_float``, levels x the weight shape, and ``bias_float``):
    the same values, a float conv. ``accumulator`` (AQD's integer BN before a grid without a
    zero level, :func:`~.export._exact_accumulator_conv`): the conv's weights unfolded (one
    scale row, no bias), then AQD Eq. 4-6 as the fake-quant conv computes
    them, ``(round(x / alpha_conv) + acc_bias) * acc_scale + acc_offset`` per level (buffers
    ``inv_acc_step``, ``acc_bias``, ``acc_scale``, ``acc_offset``).
    """

    def __init__(
        self, *, input_grid, weight_int: Optional[torch.Tensor], weight_scale: torch.Tensor,
        bias_int: Optional[torch.Tensor] = None, weight_float: Optional[torch.Tensor] = None,
        bias_float: Optional[torch.Tensor] = None, stride, padding, dilation, groups, activation=None,
        output_grid=None, accumulator: Optional[dict] = None,
    ):
        super().__init__()
        if (weight_int is None) == (weight_float is None):
            raise ValueError("QDQConv2d takes either weight_int (+ bias_int) or weight_float (+ bias_float).")
        self.input_grid = input_grid
        self.integer_weights = weight_int is not None
        if self.integer_weights:
            # int8; uint8 with the zero point 128 where x86 int8 kernels without VNNI would
            # saturate (they add pairs of uint8 x int8 products in int16, vpmaddubsw: 2 * 255 *
            # 127 > 32767); uint8 x uint8 kernels widen first (about 1.7x slower, exact)
            unsigned = 2 * uint8_max(input_grid) * int(weight_int.abs().max()) > INT16_PAIR_LIMIT
            if unsigned:
                self.register_buffer("weight_int", (weight_int + 128).to(torch.uint8))
                self.register_buffer("weight_zero_point", torch.full((weight_int.shape[0],), 128, dtype=torch.uint8))
            else:
                self.register_buffer("weight_int", weight_int.to(torch.int8))
                self.weight_zero_point = None
            self.register_buffer("bias_int", bias_int.to(torch.int32))
        else:
            self.register_buffer("weight_float", weight_float.to(torch.float32))
            self.register_buffer("bias_float", bias_float.to(torch.float32))
        self.register_buffer("weight_scale", weight_scale.to(torch.float32))
        self.register_buffer("bias_scale", (input_grid.scale * weight_scale.double()).to(torch.float32))
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.activation = activation
        self.output_grid = output_grid
        self.exact_accumulator = accumulator is not None
        if self.exact_accumulator:  # AQD Eq. 4-6 after the conv (export._exact_accumulator_conv)
            self.register_buffer("inv_acc_step", (1.0 / accumulator["step"].double()).to(torch.float32))
            for key in ("bias", "scale", "offset"):
                self.register_buffer(f"acc_{key}", accumulator[key].to(torch.float32))

    @property
    def num_levels(self) -> int:
        return (self.acc_scale if self.exact_accumulator else self.weight_scale).shape[0]

    def forward(self, x, level: int = 0, output_op=quantize_dequantize):
        """``output_op(x, output_grid)`` applies the output quantizer: the caller may fold what
        follows the conv into it (the ResNet stem's ReLU and max pool,
        :func:`quantize_relu_max_pool`)."""
        x = quantize_dequantize(x, self.input_grid)
        if self.exact_accumulator:  # the weights unfolded, the same on every level
            weight = dequantize(self.weight_int, self.weight_scale[0], self.weight_zero_point) if self.integer_weights else self.weight_float[0]
            bias = None
        elif self.integer_weights:
            weight = dequantize(self.weight_int, self.weight_scale[level], self.weight_zero_point)
            bias = dequantize(self.bias_int[level], self.bias_scale[level])
        else:
            weight, bias = self.weight_float[level], self.bias_float[level]
        x = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if self.exact_accumulator:
            view = (1, -1, 1, 1)
            eta = torch.round(x * self.inv_acc_step.view(view))  # the integer accumulator
            x = (eta + self.acc_bias[level].view(view)) * self.acc_scale[level].view(view) + self.acc_offset[level].view(view)
        if self.output_grid is not None:
            x = output_op(x, self.output_grid)
        return x if self.activation is None else self.activation(x)

    def extra_repr(self):
        g = self.input_grid
        shape = tuple((self.weight_int if self.integer_weights else self.weight_float[0]).shape)
        return (
            f"weight {shape} ({self.weight_int.dtype if self.integer_weights else 'float'}), stride={self.stride}, "
            f"input grid=[{g.q_min}, {g.q_max}] x {g.scale:.4g}, levels={self.num_levels}"
        )
