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
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QDQConv2d", "quantize_dequantize", "dequantize"]


class _QuantizeDequantize(torch.autograd.Function):
    """``clip(round(x / scale), q_min, q_max) * scale``; ONNX: Q, Clip of the integers, DQ, in
    uint8 (a signed grid with the zero point 128: the values are the same, and ONNX Runtime's
    x86 integer kernels take uint8 activations)."""

    @staticmethod
    def forward(ctx, x, scale: float, q_min: int, q_max: int):
        return torch.clamp(torch.round(x / scale), q_min, q_max) * scale

    @staticmethod
    def symbolic(g, x, scale: float, q_min: int, q_max: int):
        zero_point = 0 if q_min >= 0 else 128
        scale_node = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        zero = g.op("Constant", value_t=torch.tensor(zero_point, dtype=torch.uint8))
        q = g.op("QuantizeLinear", x, scale_node, zero)
        low, high = q_min + zero_point, q_max + zero_point
        if (low, high) != (0, 255):  # a 2..7-bit grid in an 8-bit type
            q = g.op(
                "Clip", q,
                g.op("Constant", value_t=torch.tensor(low, dtype=torch.uint8)),
                g.op("Constant", value_t=torch.tensor(high, dtype=torch.uint8)),
            )
        return g.op("DequantizeLinear", q, scale_node, zero)


def quantize_dequantize(x: torch.Tensor, scale: float, q_min: int, q_max: int) -> torch.Tensor:
    """``x`` on the grid ``{q * scale : q_min <= q <= q_max}`` (round half to even, as the fake
    quantizers and ``QuantizeLinear``)."""
    if not (-128 <= q_min < q_max <= 255) or (q_min < 0 and q_max > 127):
        raise ValueError(f"The integer range [{q_min}, {q_max}] does not fit int8 or uint8.")
    return _QuantizeDequantize.apply(x, float(scale), int(q_min), int(q_max))


class _Dequantize(torch.autograd.Function):
    """``q * scale`` with one scale per index of dim 0; ONNX: DequantizeLinear(axis=0)."""

    @staticmethod
    def forward(ctx, q, scale):
        return q.to(scale.dtype) * scale.view((-1,) + (1,) * (q.dim() - 1))

    @staticmethod
    def symbolic(g, q, scale):
        return g.op("DequantizeLinear", q, scale, axis_i=0)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The integer tensor ``q`` (int8 weights, int32 biases) times its per-output-channel
    ``scale`` (float32)."""
    return _Dequantize.apply(q, scale)


class QDQConv2d(nn.Module):
    """
    A quantized conv (+ folded BN, + activation) as Q/DQ (module docstring). Buffers:
    ``weight_int`` (int8, the conv's weight shape), ``weight_scale`` (float32, levels x C_out),
    ``bias_int`` (int32, levels x C_out), ``bias_scale`` (float32, levels x C_out,
    ``alpha_x * weight_scale``).
    """

    def __init__(
        self, *, weight_int: torch.Tensor, weight_scale: torch.Tensor, bias_int: torch.Tensor,
        input_scale: float, input_range: Sequence[int], stride, padding, dilation, groups,
        activation: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.register_buffer("weight_int", weight_int.to(torch.int8))
        self.register_buffer("weight_scale", weight_scale.to(torch.float32))
        self.register_buffer("bias_int", bias_int.to(torch.int32))
        self.register_buffer("bias_scale", (input_scale * weight_scale.double()).to(torch.float32))
        self.input_scale = float(input_scale)
        self.input_range = (int(input_range[0]), int(input_range[1]))
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.activation = activation

    @property
    def num_levels(self) -> int:
        return self.weight_scale.shape[0]

    def forward(self, x, level: int = 0):
        x = quantize_dequantize(x, self.input_scale, *self.input_range)
        weight = dequantize(self.weight_int, self.weight_scale[level])
        bias = dequantize(self.bias_int[level], self.bias_scale[level])
        x = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return x if self.activation is None else self.activation(x)

    def extra_repr(self):
        w = self.weight_int
        return (
            f"{w.shape[1] * self.groups}, {w.shape[0]}, kernel_size={tuple(w.shape[2:])}, stride={self.stride}, "
            f"input grid=[{self.input_range[0]}, {self.input_range[1]}] x {self.input_scale:.4g}, "
            f"levels={self.num_levels}"
        )
