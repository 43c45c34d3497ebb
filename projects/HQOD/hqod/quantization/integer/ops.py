"""
The integer operations of the integer-only engine (AQD Eq. 4-8): requantization by integer
multiply and shift, integer convolutions with their biases and BN shifts, the Eq. 7 adds, ReLU,
max-pooling, upsampling, and the entry quantizer where the float image comes in.
"""
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..integer_layers import IntegerGrid, fixed_point_multiplier

__all__ = [
    "IntegerConversionError",
    "IntRequant",
    "IntConv",
    "IntLevel",
    "IntConvUnit",
    "IntAdd",
    "IntQuantizeInput",
    "relu",
    "relu_",
    "max_pool",
    "upsample2",
]

_F32_EXACT = 2**24
_F64_EXACT = 2**53


class IntegerConversionError(ValueError):
    """The model cannot be converted to integer arithmetic; the message says what to use."""


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

    def __init__(self, conv: IntConv, levels: List[IntLevel], *, acc_scale, out_scale, out_max_abs: int, name: str = ""):
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
        return f"name={self.name!r}, acc_scale={_format_scale(self.acc_scale)}, out_scale={_format_scale(self.out_scale)}"


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


def relu(q: Tensor) -> Tensor:
    return q.clamp_min(0)


def relu_(q: Tensor) -> Tensor:
    return q.clamp_min_(0)


def max_pool(q: Tensor, **kwargs) -> Tensor:
    return F.max_pool2d(q.to(torch.float32), **kwargs).to(torch.int64)  # exact: |q| < 2^24


def upsample2(q: Tensor) -> Tensor:
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



def _format_scale(scale) -> str:
    if isinstance(scale, Tensor):
        return f"per channel {float(scale.min()):.4g}..{float(scale.max()):.4g}"
    return f"{scale:.4g}"


def scale_output(q: Tensor, scale) -> Tensor:
    """Integers ``q`` (NCHW) times their scale — a float, or one per channel (dim 1) — in
    float64, returned as float32: where values leave the integer network."""
    if isinstance(scale, Tensor):
        scale = scale.to(device=q.device, dtype=torch.float64).view(1, -1, 1, 1)
    return (q.to(torch.float64) * scale).to(torch.float32)
