"""
AQD's integer arithmetic (Chen et al., CVPR 2021, Sec. 3.2, Eq. 1 and 4-8), written once and
used by both sides:

* the integer-aware layers of scope ``"aqd"`` in training (:class:`~.modules.QConv2d` biases,
  :class:`~.modules.QBatchNorm2d` / :class:`~.multilevel.MultiLevelBatchNorm`, the residual
  adds of :class:`~.modules.QBasicBlock` / :class:`~.modules.QBottleneckBlock` and the top-down
  adds of :class:`~.modules.QFPN`): the fake-quant model computes what the integer engine
  computes, with straight-through gradients;
* the integer-only engine (:mod:`hqod.quantization.integer`), which computes it with integers.

Every quantized tensor is ``x_hat = q * alpha`` with an integer ``q`` and a scale ``alpha``
(AQD Eq. 1); :class:`IntegerGrid` says which ``q`` and ``alpha`` a quantizer produces. A conv of
two such tensors is ``eta_conv * alpha_conv`` with ``alpha_conv = alpha_x * alpha_w`` (Eq. 4).

* :func:`shift_approx` — ``F(m, n) = c / 2^d`` (Eq. 8).
* :func:`align_add` / :func:`aligned_add` — the skip-add of Eq. 7.
* :func:`integer_bn_params` / :func:`integer_batch_norm` — the BN with the rounded shift of
  Eq. 5-6 (output scale ``alpha_z = alpha_conv * gamma / sigma`` per channel).
* :func:`integer_bias_value` / :func:`integer_bias` — a conv bias as an integer in units of the
  accumulator step (what an integer accelerator adds to its int32 accumulator);
  :func:`round_to_grid` — a conv output as its exact int32 accumulator times the step.
* :func:`fixed_point_multiplier` — requantization by an integer multiply and a shift.
"""
import math
from dataclasses import dataclass
from fractions import Fraction
from numbers import Rational
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import functional

__all__ = [
    "INT32_MAX",
    "IntegerGrid",
    "shift_approx",
    "add_max_shift",
    "AddAlignment",
    "align_add",
    "aligned_add",
    "fixed_point_multiplier",
    "integer_bias_value",
    "integer_bias",
    "round_to_grid",
    "integer_bn_params",
    "integer_batch_norm",
]

INT32_MAX = 2**31 - 1
Number = Union[int, float, Fraction]


# ---------------------------------------------------------------------------------------------
# The integer representation of a quantizer's output (AQD Eq. 1).
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IntegerGrid:
    """
    The grid of a fake quantizer, ``x_hat = step * (eta - offset)`` with
    ``eta = clip(round(x / step + offset), eta_min, eta_max)``, as integers: ``x_hat = q * scale``
    with ``q = m * eta - m * offset`` and ``scale = step / m``, where ``m = 2`` when the offset is
    a half-integer (AQD's zero-free signed grid, Eq. 3: ``q`` = the odd integers in
    ``[-(2^b - 1), 2^b - 1]``, ``scale = nu / (2^b - 1)``) and ``m = 1`` otherwise (LSQ, TQT,
    AQD Eq. 2: ``q = eta``, ``scale = step``).

    Attributes:
        step: the distance between two levels, as the quantizer computes it (float64); for a
            per-channel weight quantizer a (C,) float64 tensor (then ``scale`` is one too).
        eta_min, eta_max: the clip range of ``eta``.
        offset2: twice the offset (an integer: 0, or ``2^b - 1``).
    """

    step: Union[float, Tensor]
    eta_min: int
    eta_max: int
    offset2: int = 0

    @property
    def m(self) -> int:
        return 2 if self.offset2 % 2 else 1

    @property
    def scale(self) -> float:
        """The value of one integer unit: ``x_hat = q * scale``."""
        return self.step / self.m

    @property
    def q_offset(self) -> int:
        """``m * offset``: ``q = m * eta - q_offset``."""
        return self.m * self.offset2 // 2

    @property
    def q_min(self) -> int:
        return self.m * self.eta_min - self.q_offset

    @property
    def q_max(self) -> int:
        return self.m * self.eta_max - self.q_offset

    @property
    def max_abs(self) -> int:
        return max(abs(self.q_min), abs(self.q_max))


# ---------------------------------------------------------------------------------------------
# F(m, n) = c / 2^d (AQD Eq. 8) and the skip-add (Eq. 7).
# ---------------------------------------------------------------------------------------------
def _as_fraction(x: Number, what: str) -> Fraction:
    if isinstance(x, bool) or not isinstance(x, (int, float, Rational)):
        raise TypeError(f"shift_approx: {what} must be a real number; got {type(x).__name__}.")
    if isinstance(x, float) and not math.isfinite(x):
        raise ValueError(f"shift_approx: {what} must be finite; got {x}.")
    return Fraction(x)


def _best_c(p: int, q: int, d: int) -> Tuple[int, int]:
    """Best ``c`` for ``p/q ~ c/2^d`` and its error numerator ``|p*2^d - c*q|`` (the error is
    that over ``q*2^d``); on a tie the smaller ``c``."""
    t = p << d
    c, rem = divmod(t, q)
    if 2 * rem > q:  # strictly closer to c + 1
        return c + 1, q - rem
    return c, rem


def shift_approx(m: Number, n: Number, max_shift: int = 31) -> Tuple[int, int]:
    """
    AQD Eq. 8: ``F(m, n) = c / 2^d``, the best approximation of ``m / n`` (``m >= n > 0``) by a
    natural number ``c`` over a power of two ``2^d`` with ``1 <= d <= max_shift``::

        c, d = argmin |m/n - c/2^d|   over c in N, d in {1, ..., max_shift}

    ``m`` and ``n`` (ints, floats or Fractions) are taken as exact rationals and the search is
    exact (integer arithmetic), so the result is the true argmin.

    Tie-breaking: among the pairs with the smallest error, the smallest ``d``, then the smallest
    ``c``. The error never grows with ``d`` (``c/2^d = 2c/2^(d+1)``), so the smallest error is
    the one at ``d = max_shift`` and the rule returns it in lowest terms (``c`` odd, or
    ``d = 1``); an exact ``m/n = c/2^d`` comes back as that fraction.

    Bound on ``c``: ``c <= (m/n) * 2^d + 1/2 <= (m/n) * 2^max_shift + 1/2``. Eq. 7 adds
    ``eta_1 * 2^d + eta_2 * c`` (or ``eta_1 * c + eta_2 * 2^d``) in the accumulator; with
    ``|eta_i| <= A_i`` that sum stays in int32 iff ``A_1 * 2^d + A_2 * c <= 2^31 - 1``, which
    holds when ``2^d <= (2^31 - 1 - A_2 / 2) / (A_1 + A_2 * m/n)`` — :func:`add_max_shift`
    returns the largest such ``max_shift``. For the bit widths used (inputs on b-bit grids,
    ``A <= 2^b - 1``; AQD's signed grid reaches ``+-(2^b - 1)``) and ``m/n <= 3``: b = 2 ->
    ``d <= 27``, b = 4 -> ``d <= 25``, b = 8 -> ``d <= 21``, i.e. ``c < 2^(31 - b)``.

    Returns:
        (c, d) as Python ints.
    """
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 1:
        raise ValueError(f"shift_approx: max_shift must be an int >= 1; got {max_shift!r}.")
    fm, fn = _as_fraction(m, "m"), _as_fraction(n, "n")
    if fn <= 0:
        raise ValueError(f"shift_approx: n must be > 0; got {n!r}.")
    r = fm / fn
    if r < 1:
        raise ValueError(f"shift_approx approximates m/n with m >= n (AQD Eq. 8); got m={m!r} < n={n!r}.")
    p, q = r.numerator, r.denominator
    c_max, err_max = _best_c(p, q, max_shift)
    # errors compared over the common denominator q * 2^max_shift
    for d in range(1, max_shift + 1):
        c, err = _best_c(p, q, d)
        if err << (max_shift - d) == err_max:
            return c, d
    return c_max, max_shift  # pragma: no cover  (d = max_shift always matches)


def add_max_shift(ratio: Number, max_abs_small: int, max_abs_large: int, limit: int = INT32_MAX) -> int:
    """
    The largest ``d`` (1..31) for which Eq. 7's aligned sum stays within ``limit`` (int32):
    ``max_abs_small * 2^d + max_abs_large * c <= limit`` for every ``c <= ratio * 2^d + 1/2``,
    where ``max_abs_small`` bounds the integers of the input with the smaller scale (multiplied
    by ``2^d``) and ``max_abs_large`` those of the input rescaled by ``F = c / 2^d``.
    """
    r = Fraction(ratio)
    if max_abs_small + max_abs_large * (2 * r + Fraction(1, 2)) > limit:
        raise ValueError(
            f"Eq. 7 add of integers up to {max_abs_small} and {max_abs_large} (scale ratio "
            f"{float(r):.4g}) cannot stay within {limit} for any d >= 1."
        )
    d = 1
    while d < 31 and max_abs_small * 2 ** (d + 1) + max_abs_large * (r * 2 ** (d + 1) + Fraction(1, 2)) <= limit:
        d += 1
    return d


@dataclass(frozen=True)
class AddAlignment:
    """
    Eq. 7 for ``y = eta_1 * alpha_1 + eta_2 * alpha_2``: the input with the larger scale
    (``rescaled``: 1 or 2) has its integers multiplied by ``c`` and the other's by ``2^d``, so the
    integer sum ``S`` has the scale ``out_scale = min(alpha_1, alpha_2) / 2^d``:

    * ``rescaled == 2`` (``alpha_2 >= alpha_1``): ``S = eta_1 * 2^d + eta_2 * c``,
      ``y_bar = S * alpha_1 / 2^d = (eta_1 + eta_2 * F(alpha_2, alpha_1)) * alpha_1``;
    * ``rescaled == 1``: ``S = eta_1 * c + eta_2 * 2^d``,
      ``y_bar = (eta_1 * F(alpha_1, alpha_2) + eta_2) * alpha_2``.

    ``factor1`` / ``factor2`` are what the float inputs ``x_i = eta_i * alpha_i`` are multiplied
    by in training so that ``x_1 * factor1 + x_2 * factor2 = y_bar`` (one of them is 1).
    """

    c: int
    d: int
    rescaled: int
    alpha1: float
    alpha2: float

    @property
    def out_scale(self) -> float:
        return min(self.alpha1, self.alpha2) / 2**self.d

    @property
    def factor1(self) -> float:
        if self.rescaled == 1:
            return self.c / 2**self.d * self.alpha2 / self.alpha1
        return 1.0

    @property
    def factor2(self) -> float:
        if self.rescaled == 2:
            return self.c / 2**self.d * self.alpha1 / self.alpha2
        return 1.0


def align_add(alpha1: float, alpha2: float, max_abs1: int, max_abs2: int) -> AddAlignment:
    """
    The integer skip-add of AQD Eq. 7 for two inputs with scales ``alpha1``, ``alpha2`` (the
    integer scales of their grids) and integers bounded by ``max_abs1``, ``max_abs2``: the
    larger scale is aligned to the smaller one with ``F(larger, smaller)`` (:func:`shift_approx`)
    with the largest shift that keeps the sum in int32 (:func:`add_max_shift`).
    """
    if not (alpha1 > 0 and alpha2 > 0):
        raise ValueError(f"Eq. 7 needs positive scales; got {alpha1}, {alpha2}.")
    if alpha2 >= alpha1:
        small, large, a_small, a_large, rescaled = alpha1, alpha2, max_abs1, max_abs2, 2
    else:
        small, large, a_small, a_large, rescaled = alpha2, alpha1, max_abs2, max_abs1, 1
    ratio = Fraction(large) / Fraction(small)
    c, d = shift_approx(large, small, add_max_shift(ratio, a_small, a_large))
    assert a_small * 2**d + a_large * c <= INT32_MAX
    return AddAlignment(c=c, d=d, rescaled=rescaled, alpha1=float(alpha1), alpha2=float(alpha2))


def aligned_add(x1: Tensor, x2: Tensor, alignment: Optional[AddAlignment]) -> Tensor:
    """``x1 + x2`` as Eq. 7 computes it (the larger-scale input rescaled by ``F``), on the fake-
    quantized inputs ``x_i = eta_i * alpha_i``; the factor is a constant for autograd (the
    inputs' gradients are scaled by it, ~1). ``alignment=None``: the plain sum."""
    if alignment is None:
        return x1 + x2
    if alignment.rescaled == 2:
        return x1 + x2 * alignment.factor2
    return x1 * alignment.factor1 + x2


# ---------------------------------------------------------------------------------------------
# Requantization: integer multiply + shift.
# ---------------------------------------------------------------------------------------------
def _round_half_even(x: Fraction) -> int:
    fl = math.floor(x)
    diff = x - fl
    if diff > Fraction(1, 2) or (diff == Fraction(1, 2) and fl % 2):
        return fl + 1
    return fl


def fixed_point_multiplier(
    ratio: float, *, max_abs_input: int, offset2: int = 0, bits: int = 31, limit_bits: int = 63
) -> Tuple[int, int]:
    """
    ``(M, k)`` with ``M / 2^k ~ ratio`` for requantizing integers ``q`` (``|q| <= max_abs_input``)
    onto another grid: ``eta = round(q * ratio + offset2 / 2)`` is computed as
    ``round((2 * q * M + offset2 * 2^k) / 2^(k+1))`` (integer multiply, add, shift).

    ``M`` is ``ratio * 2^k`` rounded (half to even), ``|M| < 2^bits`` (31: an int32
    multiplier, as gemmlowp / TFLite), with the largest ``k`` such that the product and sum stay
    below ``2^limit_bits`` (the int64 of the multiply-high). Relative error ``<= 2^-(bits-1)``;
    for a ratio so small that the offset term bounds ``k`` (below ~2^-22), the absolute error
    ``max_abs_input * |M / 2^k - ratio|`` is then what stays tiny (< 2^-24 output steps).
    """
    r = Fraction(ratio)
    if r == 0:
        raise ValueError("fixed_point_multiplier: ratio 0 carries no information (a zero scale).")
    # |M| in [2^(bits-1), 2^bits): k = bits - 1 - floor(log2 |r|)
    k = bits - 1 - (math.floor(math.log2(abs(float(r)))) if abs(float(r)) > 0 else 0)
    while True:
        M = _round_half_even(r * 2**k) if k >= 0 else _round_half_even(r / 2 ** (-k))
        if abs(M) >= 2**bits:
            k -= 1
            continue
        need = 2 * max_abs_input * abs(M) + abs(offset2) * 2 ** max(k, 0) + 2 ** (max(k, 0) + 1)
        if need >= 2**limit_bits and k > 0:
            k -= 1
            continue
        break
    if k < 0:
        raise ValueError(f"fixed_point_multiplier: ratio {float(r):.4g} is too large for {bits}-bit multipliers.")
    return M, k


# ---------------------------------------------------------------------------------------------
# Integer bias and integer BN (Eq. 5-6); per channel, float64.
# ---------------------------------------------------------------------------------------------
def integer_bias_value(bias: Tensor, acc_step: float) -> Tensor:
    """``round(bias / alpha_conv)`` (float64, half to even): the conv bias as an integer in units
    of the accumulator step ``alpha_conv = alpha_x * alpha_w`` (Eq. 4)."""
    return torch.round(bias.detach().double() / acc_step)


def integer_bias(bias: Tensor, acc_step: float) -> Tensor:
    """The bias the integer engine adds, ``round(b / alpha_conv) * alpha_conv``, with a
    straight-through gradient to ``b``."""
    rounded = integer_bias_value(bias, acc_step) * acc_step
    return bias + (rounded - bias.detach().double()).to(bias.dtype)


def _per_channel(value, x: Tensor):
    """A per-channel (C,) float64 ``value`` as x's dtype, viewed along dim 1 of ``x``; a float
    as it is (PyTorch rounds it to x's dtype)."""
    if isinstance(value, Tensor):
        return value.to(x.dtype).view((1, -1) + (1,) * (x.dim() - 2))
    return value


class _RoundToGrid(torch.autograd.Function):
    """``round(x / step) * step`` forward, identity backward (straight-through)."""

    @staticmethod
    def forward(ctx, x, step):
        return torch.mul(x, _per_channel(1.0 / step, x)).round_().mul_(_per_channel(step, x))

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def round_to_grid(x: Tensor, step) -> Tensor:
    """``x`` rounded to the nearest multiple of ``step`` (half to even; a float, or one step per
    channel of dim 1), straight-through. On a conv output ``x = eta_conv * alpha_conv`` with
    ``step = alpha_conv`` this removes the float rounding noise of the convolution: the result
    is the exact int32 accumulator times its step (exactly 0 where the accumulator is 0), as the
    integer engine has it."""
    return _RoundToGrid.apply(x, step if isinstance(step, Tensor) else float(step))


def integer_bn_params(
    mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, acc_step: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """
    AQD Eq. 5-6 per channel, in float64, for a BN fed by a conv with accumulator step
    ``acc_step`` (``alpha_conv``)::

        z = (eta_conv * alpha_conv - mu) / sigma * gamma + beta = (eta_conv + s) * alpha_z   (5)
        alpha_z = alpha_conv * gamma / sigma,   s = (beta * sigma / gamma - mu) / alpha_conv
        z_bar = (eta_conv + round(s)) * alpha_z                                              (6)

    with ``sigma = sqrt(var + eps)`` (``mean``/``var``: running statistics in evaluation, batch
    statistics in training). Rounding is half to even. A channel with ``gamma = 0`` has
    ``alpha_z = 0`` and the constant output ``beta``; it gets ``round(s) = 0`` here and
    ``offset = beta``.

    Returns:
        ``(alpha_z, s_rounded, offset)``, float64 tensors of shape (C,), with
        ``z_bar = eta_conv * alpha_z + offset`` (``offset = round(s) * alpha_z``).
    """
    mean, var = mean.detach().double(), var.detach().double()
    a = torch.rsqrt(var + eps)
    if weight is not None:
        a = a * weight.detach().double()
    t = -mean * a
    if bias is not None:
        t = t + bias.detach().double()
    alpha_z = acc_step * a
    zero = alpha_z == 0
    s = t / torch.where(zero, torch.ones_like(alpha_z), alpha_z)
    s_round = torch.where(zero, torch.zeros_like(s), torch.round(s))
    offset = torch.where(zero, t, s_round * alpha_z)
    return alpha_z, s_round, offset


def _batch_stats(bn, x: Tensor) -> Tuple[Tensor, Tensor]:
    """Batch mean and biased variance over (N, H, W) as ``bn`` normalizes with them, detached;
    the running statistics updated as ``torch.nn.BatchNorm2d`` does. A synchronized BN in a
    multi-process run averages the statistics over processes (its own forward updates the
    running ones)."""
    x = x.detach()
    if _is_synced(bn):
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        vec = torch.cat([mean, var + mean * mean]).double()
        torch.distributed.all_reduce(vec)
        vec /= torch.distributed.get_world_size()
        mean, meansqr = vec.split(x.shape[1])
        return mean.to(x.dtype), (meansqr - mean * mean).to(x.dtype)
    track = bn.track_running_stats and bn.running_mean is not None
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if track and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    return torch.batch_norm_update_stats(
        x, bn.running_mean if track else None, bn.running_var if track else None, momentum
    )


def _is_synced(bn) -> bool:
    from detectron2.layers import NaiveSyncBatchNorm
    from detectron2.utils import comm

    return isinstance(bn, (torch.nn.SyncBatchNorm, NaiveSyncBatchNorm)) and comm.get_world_size() > 1


def _eq6_native(x: Tensor, acc_step, alpha_z: Tensor, s_round: Tensor) -> Optional[Tensor]:
    """``(round(x * (1 / acc_step)) + round(s)) * alpha_z`` in one pass with the native kernel
    (:mod:`._native`), bit-identical to the PyTorch ops of :func:`_eq6`; None where the kernel
    does not apply (not a contiguous float32 NCHW tensor on CPU, a backend other than
    "auto"/"native", no compiler)."""
    if x.dim() != 4 or isinstance(acc_step, Tensor) or x.numel() == 0:
        return None
    lib = functional._native_lib(x)  # contiguous float32 on CPU, and the backend allows it
    if lib is None:
        return None
    n, c, h, w = x.shape
    if alpha_z.numel() != c or s_round.numel() != c or alpha_z.device != x.device or s_round.device != x.device:
        return None  # the PyTorch ops raise
    # what torch.mul(x, 1.0 / acc_step) multiplies by: the Python float rounded to float32 (the
    # c_float argument), and the per-channel vectors as .to(float32) rounds them
    s = s_round.to(torch.float32).contiguous()
    a = alpha_z.to(torch.float32).contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    lib.hqod_int_bn_forward_f32(
        x.data_ptr(), out.data_ptr(), n * c, c, h * w, 1.0 / acc_step, s.data_ptr(), a.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def _eq6(x: Tensor, acc_step, alpha_z: Tensor, s_round: Tensor, offset: Tensor) -> Tensor:
    """Eq. 6 on ``x = eta_conv * alpha_conv`` (NCHW): ``(round(x / alpha_conv) + round(s)) *
    alpha_z``, plus ``offset`` (``beta``) in the channels with ``alpha_z = 0`` (``gamma = 0``)."""
    z = _eq6_native(x, acc_step, alpha_z, s_round)
    if z is None:
        view = (1, -1, 1, 1)
        z = torch.mul(x, _per_channel(1.0 / acc_step, x)).round_()  # the exact int32 accumulator
        # (eta_conv + round(s)) first: an exact integer, so z is exactly 0 where it is 0
        z.add_(s_round.to(x.dtype).view(view)).mul_(alpha_z.to(x.dtype).view(view))
    zero = alpha_z == 0
    if zero.any():  # gamma = 0: the constant beta
        z.add_(torch.where(zero, offset, torch.zeros_like(offset)).to(x.dtype).view(1, -1, 1, 1))
    return z


class _IntegerBatchNorm(torch.autograd.Function):
    """Forward: Eq. 6 exactly, ``(round(x / alpha_conv) + round(s)) * alpha_z`` (the integer sum
    first, then one rounding of the product; one native pass for float32 on CPU, :func:`_eq6`);
    backward: the float BN's (Eq. 5) gradients for ``x``, ``gamma``, ``beta`` (straight-through
    roundings)."""

    @staticmethod
    def forward(ctx, x, weight, bias, acc_step, alpha_z, s_round, offset, bn_stats):
        mean, invstd, running_mean, running_var, train, eps = bn_stats
        z = _eq6(x, acc_step, alpha_z, s_round, offset)
        ctx.save_for_backward(x, weight, mean, invstd, running_mean, running_var)
        ctx.train, ctx.eps = train, eps
        return z

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd, running_mean, running_var = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(), x, weight, running_mean, running_var,
            mean if ctx.train else None, invstd if ctx.train else None, ctx.train, ctx.eps, mask,
        )
        return gx, gw, gb, None, None, None, None, None


def integer_batch_norm(bn, x: Tensor, acc_step: float, base_forward=None) -> Tensor:
    """
    The BN ``bn`` (a ``torch.nn`` batch norm module) on a conv output ``x = eta_conv *
    alpha_conv`` as AQD Eq. 6 computes it, ``z_bar = (eta_conv + round(s)) * alpha_z`` with
    ``eta_conv = round(x / alpha_conv)`` (the exact accumulator: float rounding noise of the conv
    removed, so that ``z_bar`` is exactly 0 where the integer ``eta_conv + round(s)`` is 0, as
    in the integer engine). Straight-through: the gradients are those of the float BN (Eq. 5).
    Training uses the batch statistics (those of all processes for a synchronized BN) and
    updates the running ones as the BN does; evaluation the running ones.

    ``base_forward(x)``: the module's own forward, used for synchronized BN in multi-process
    training (its gradient, with the value replaced by Eq. 6).
    """
    train = bn.training or bn.running_mean is None
    if train:
        mean, var = _batch_stats(bn, x)
    else:
        mean, var = bn.running_mean, bn.running_var
    alpha_z, s_round, offset = integer_bn_params(mean, var, bn.weight, bn.bias, bn.eps, acc_step)
    stats = (mean, torch.rsqrt(var + bn.eps), bn.running_mean, bn.running_var, train, bn.eps)
    args = (bn.weight, bn.bias, acc_step, alpha_z, s_round, offset, stats)
    if train and _is_synced(bn):
        with torch.no_grad():
            exact = _IntegerBatchNorm.apply(x, *args)
        z = base_forward(x)
        return z + (exact - z).detach()
    return _IntegerBatchNorm.apply(x, *args)
