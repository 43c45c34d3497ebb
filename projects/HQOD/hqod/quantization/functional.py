"""
One fused fake-quantization autograd function shared by every learned-step quantizer.

All quantizers of this package (LSQ, TQT, LQ) are uniform grids ``x_hat = s * (eta - o)`` with
``eta = clip(round(x / s + o), qmin, qmax)``, a step ``s`` and a constant offset ``o`` (0 for LSQ
and TQT; ``(2^b - 1) / 2`` for AQD's zero-free weight grid, AQD Eq. 3). With a straight-through
round, their gradients are

    d x_hat / d x = 1 where the input is "inside" the grid, else 0            (HQOD Eq. 3)
    d x_hat / d s = (x_hat - x * inside) / s                                   (LSQ, TQT Eq. 7)

i.e. ``round(v) - v`` inside and the clipped level ``eta - o`` outside, so that

    dL/ds = sum(g * x_hat - g * inside * x) / s

needs no temporary tensor. What "inside" means differs:

* ``rounded_mask=False`` (LSQ as HQOD Eq. 3, LQ as autograd of AQD Eq. 2-3): the UNROUNDED value
  is tested, ``qmin <= x / s + o <= qmax``.
* ``rounded_mask=True`` (TQT, Jain et al. Eq. 5-7): the ROUNDED value is tested,
  ``qmin <= round(x / s + o) <= qmax``.

Backends (:func:`set_backend`, or the environment variable ``HQOD_QUANT_BACKEND``):

* ``"native"`` (float32 on CPU): two small C kernels of :mod:`._native` (which also holds the
  one-pass integer BN of :mod:`.integer_layers`), one pass forward and
  one pass backward (input gradient and the step-gradient sum together, accumulated in float64,
  the output recomputed on the fly instead of saved); compiled once per machine with the system
  C compiler (about a second) and called through ctypes.
* ``"inductor"``: the same two passes written in PyTorch ops (:func:`_grid`,
  :func:`_grid_backward`) and compiled by ``torch.compile`` (dynamic shapes: one kernel for every
  layer; about 20 s the first time, cached on disk by PyTorch). Per call it costs the
  torch.compile dispatch (~50 us), so tensors under 8k elements take the eager path.
* ``"eager"``: PyTorch's fused ``fake_quantize_per_tensor_affine`` forward; backward = one fused
  ``hardtanh_backward`` (CPU) for the input gradient and two dot products for the step gradient.
* ``"auto"`` (default): native for float32 on CPU, inductor elsewhere (GPU: Triton), eager for
  what neither covers; a backend that cannot be built logs a warning and is skipped.

float64 inputs always take the exact eager composite path (PyTorch's fused kernel computes in
float32), which tests compare against written-out references.
"""
import logging
import math
import os

import numpy as np
import torch
from torch import Tensor

from . import _native

__all__ = [
    "fake_quantize_ste",
    "fake_quantize_param",
    "step_from_param",
    "round_ste",
    "ceil_ste",
    "set_backend",
    "get_backend",
    "kernel_for",
]

logger = logging.getLogger(__name__)

_BACKENDS = ("auto", "native", "inductor", "eager")
_backend = os.environ.get("HQOD_QUANT_BACKEND", "auto")
if _backend not in _BACKENDS:
    raise ValueError(f"HQOD_QUANT_BACKEND must be one of {_BACKENDS}; got {_backend!r}.")


def set_backend(name: str):
    """Select how fake quantization runs: ``"auto"``, ``"native"``, ``"inductor"`` or
    ``"eager"`` (see the module docstring)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}; got {name!r}.")
    _backend = name


def get_backend() -> str:
    return _backend


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` in the forward pass, identity in the backward pass (straight-through)."""
    return x + (torch.round(x) - x).detach()


def ceil_ste(x: Tensor) -> Tensor:
    """``ceil(x)`` in the forward pass, identity in the backward pass (straight-through)."""
    return x + (torch.ceil(x) - x).detach()


# ---------------------------------------------------------------------------------------------
# The math, written once; compiled by inductor or run eagerly (float64 references).
# ---------------------------------------------------------------------------------------------
def _grid(x: Tensor, step: Tensor, consts: Tensor) -> Tensor:
    """``consts = [qmin, qmax, offset]`` (a tensor: compiled kernels then do not specialize on
    the bit width)."""
    qmin, qmax, offset = consts[0], consts[1], consts[2]
    return (torch.clamp(torch.round(x / step + offset), qmin, qmax) - offset) * step


def _grid_backward(grad, x, step, consts, rounded: bool):
    """(input gradient, sum(g * x_hat - g * inside * x)) in one pass over ``grad`` and ``x``."""
    qmin, qmax, offset = consts[0], consts[1], consts[2]
    v = x / step + offset
    t = torch.round(v) if rounded else v
    inside = (t >= qmin) & (t <= qmax)
    grad_x = torch.where(inside, grad, torch.zeros_like(grad))
    out = (torch.clamp(torch.round(v), qmin, qmax) - offset) * step
    return grad_x, (grad * out - grad_x * x).sum()


_compiled = {}
# Below this size the torch.compile dispatch costs more than PyTorch's ATen kernels.
_FUSED_MIN_NUMEL = 1 << 13


def _inductor(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def _native_lib(x: Tensor):
    """The native kernels when the backend allows them for ``x`` (contiguous float32 on CPU),
    else None."""
    if _backend not in ("auto", "native") or x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    if not x.is_contiguous():  # the kernels walk memory linearly
        return None
    lib = _native.load()
    if lib is None and _backend == "native":
        raise RuntimeError("HQOD_QUANT_BACKEND=native but the native kernels could not be built.")
    return lib


_inductor_failed = False


def _use_inductor(x: Tensor) -> bool:
    if _backend == "inductor":
        return True
    return _backend == "auto" and not _inductor_failed and x.numel() >= _FUSED_MIN_NUMEL


def kernel_for(x: Tensor) -> str:
    """Which implementation fake-quantizes ``x`` under the current backend: ``"exact"``
    (float64: eager composite), ``"native"`` (contiguous float32 on CPU), ``"fused"``
    (torch.compile: Triton on a GPU, C++ on a CPU) or ``"aten"`` (PyTorch's fused kernel)."""
    if x.dtype == torch.float64:
        return "exact"
    if _native_lib(x) is not None:
        return "native"
    return "fused" if _use_inductor(x) else "aten"


def _run(fn, *args, **kwargs):
    """Run ``fn`` compiled; under "auto", a failing compile (no C++ compiler, no Triton) is
    logged once and ``fn`` runs eagerly, now and from then on."""
    global _inductor_failed
    if not _inductor_failed:
        try:
            return _inductor(fn)(*args, **kwargs)
        except Exception as e:
            if _backend == "inductor":
                raise
            logger.warning(f"Compiled fake-quant kernels unavailable ({type(e).__name__}: {e}); using eager ops.")
            _inductor_failed = True
    return fn(*args, **kwargs)


_constants = {}


def _consts(qmin: int, qmax: int, offset: float, like: Tensor) -> Tensor:
    """``[qmin, qmax, offset]`` as a tensor on ``like``'s device and dtype, cached."""
    key = (qmin, qmax, offset, like.dtype, like.device)
    t = _constants.get(key)
    if t is None:
        t = _constants[key] = torch.tensor([qmin, qmax, offset], dtype=like.dtype, device=like.device)
    return t


# ---------------------------------------------------------------------------------------------
# From the learned parameter to the step.
# ---------------------------------------------------------------------------------------------
STEP_EPS = 1e-8
_LN2 = math.log(2.0)


def step_from_param(param: Tensor, kind: str, k: float) -> Tensor:
    """The step given by a learned parameter ``p`` (a differentiable tensor expression):
    ``kind="linear"``: ``max(|p| * k, eps)``; ``kind="pow2"``: ``2^(ceil(p) - k)`` with a
    straight-through ceil (TQT)."""
    if kind == "pow2":
        return torch.exp2(ceil_ste(param) - k)
    return (param.abs() * k).clamp_min(STEP_EPS)


def _step_and_slope(param: Tensor, kind: str, k: float):
    """``(s, ds/dp)``: Python floats on CPU (exact, no tensor ops), 0-d tensors elsewhere."""
    if param.device.type == "cpu":
        p = param.item()
        if kind == "pow2":
            s = 2.0 ** (math.ceil(p) - k)
            return s, s * _LN2
        s = abs(p) * k
        return (s, math.copysign(k, p)) if s > STEP_EPS else (STEP_EPS, 0.0)
    return _step_and_slope_tensor(param, kind, k)


def _step_and_slope_tensor(param: Tensor, kind: str, k: float):
    """:func:`_step_and_slope` with device tensors (no host synchronization)."""
    p = param.detach().reshape(())
    if kind == "pow2":
        s = torch.exp2(torch.ceil(p) - k)
        return s, s * _LN2
    a = p.abs() * k
    return a.clamp_min(STEP_EPS), torch.where(a > STEP_EPS, torch.sign(p) * k, torch.zeros_like(p))


def _as_tensor(value, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(like.dtype)
    return torch.tensor(value, dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------------------------------------
# Eager ATen path (float32/16 without inductor, and tensors too small for a compiled call).
# ---------------------------------------------------------------------------------------------
def _aten_forward(x, step, qmin: int, qmax: int, offset: float, rounded: bool):
    """(output, rounded mask or None) with PyTorch's fused fake-quant kernel."""
    if isinstance(step, Tensor):  # not on CPU: keep the step on the device (no sync)
        scale, zp = step.to(torch.float32).reshape(1), torch.zeros(1, dtype=torch.int32, device=x.device)
        enabled = torch.ones(1, dtype=torch.long, device=x.device)
        shift = step.to(x.dtype) * offset if offset else None
        xs = x + shift if offset else x
        out, mask = torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(xs, scale, zp, enabled, qmin, qmax)
    else:
        shift = step * offset
        xs = x + shift if offset else x
        out, mask = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(xs, step, 0, qmin, qmax)
    if offset:
        out = out.sub_(shift)
    return out, (mask if rounded else None)


def _aten_masked_grad(grad, x, step, qmin: int, qmax: int, offset: float):
    """``grad`` where ``qmin <= x / s + o <= qmax`` (inclusive, unrounded), else 0."""
    if not isinstance(step, Tensor):
        # hardtanh_backward keeps grad where lo < x < hi (exclusive); moving both bounds one ulp
        # (of x's dtype) outwards makes it inclusive. One fused pass, no boolean temporaries.
        dtype = np.float32 if x.dtype != torch.float64 else np.float64
        lo = float(np.nextafter(dtype(step * (qmin - offset)), dtype(-np.inf)))
        hi = float(np.nextafter(dtype(step * (qmax - offset)), dtype(np.inf)))
        return torch.ops.aten.hardtanh_backward(grad, x, lo, hi)
    v = x / step.to(x.dtype) + offset
    return torch.where((v >= qmin) & (v <= qmax), grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


class _FakeQuantizeSTE(torch.autograd.Function):
    """Fake quantization on the grid of :func:`_grid`, differentiable w.r.t. ``x`` and the
    learned parameter that gives the step (:func:`step_from_param`): one autograd node per
    call, with the chain rule through the step done in the backward pass."""

    @staticmethod
    def forward(ctx, x, param, kind, k, qmin, qmax, offset, grad_factor, rounded_mask, save_output):
        step, slope = _step_and_slope(param, kind, k)
        mask = out_saved = None
        x = x.contiguous()  # the kernels walk memory linearly
        mode = kernel_for(x)
        if mode == "exact":
            out = _grid(x, _as_tensor(step, x), _consts(qmin, qmax, offset, x))
        elif mode == "native":
            out = torch.empty_like(x)
            _native.load().hqod_fq_forward_f32(
                x.data_ptr(), out.data_ptr(), x.numel(), step, qmin, qmax, offset, torch.get_num_threads()
            )
        elif mode == "fused":
            # flattened: one compiled kernel for every shape; written into a tensor of x's shape,
            # as a view of the flat result would be an output in-place ops cannot modify
            flat = _run(_grid, x.detach().reshape(-1), _as_tensor(step, x), _consts(qmin, qmax, offset, x))
            out = torch.empty_like(x)
            out.view(-1).copy_(flat)
            # "exact" (eager composite) only for the one call during which compiling failed
            mode = "exact" if _inductor_failed else "fused"
        else:
            out, mask = _aten_forward(x, step, qmin, qmax, offset, rounded_mask)
            if save_output:
                out_saved = out
        ctx.qparams = (qmin, qmax, offset, grad_factor, rounded_mask, mode, step, slope)
        # The output is saved only by the ATen path and only where its consumer does not modify
        # it in place (conv/linear inputs and weights); otherwise it is recomputed.
        ctx.save_for_backward(x, param, mask, out_saved)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, param, mask, out = ctx.saved_tensors
        qmin, qmax, offset, grad_factor, rounded_mask, mode, step, slope = ctx.qparams
        if mode == "native":
            grad = grad.contiguous()
            grad_x = torch.empty_like(x)
            num = _native.load().hqod_fq_backward_f32(
                grad.data_ptr(), x.data_ptr(), grad_x.data_ptr(), x.numel(), step, qmin, qmax,
                offset, int(rounded_mask), torch.get_num_threads(),
            )  # a Python float (C double), as step and slope are on this path
        elif mode in ("exact", "fused"):
            c = _consts(qmin, qmax, offset, x)
            if mode == "exact":
                grad_x, num = _grid_backward(grad, x, _as_tensor(step, x), c, rounded_mask)
            else:
                grad_x, num = _run(
                    _grid_backward, grad.detach().reshape(-1), x.detach().reshape(-1), _as_tensor(step, x), c, rounded_mask
                )
                grad_x = grad_x.view(x.shape)
        else:
            if out is None:
                out, _ = _aten_forward(x, step, qmin, qmax, offset, False)
            if mask is not None:
                grad_x = torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
            elif rounded_mask:
                v = torch.round(x / _as_tensor(step, x) + offset)
                grad_x = torch.where((v >= qmin) & (v <= qmax), grad, torch.zeros_like(grad))
            else:
                grad_x = _aten_masked_grad(grad, x, step, qmin, qmax, offset)
            num = torch.dot(grad.reshape(-1), out.reshape(-1)) - torch.dot(grad_x.reshape(-1), x.reshape(-1))
        grad_param = None
        if ctx.needs_input_grad[1]:
            # dL/dp = sum(g * dx_hat/ds) * grad_factor * ds/dp, dx_hat/ds = (x_hat - x*inside)/s
            value = num * (slope * grad_factor / step)  # float64, then param's dtype
            if isinstance(value, Tensor):
                grad_param = value.to(param.dtype).reshape(param.shape)
            else:  # one small tensor op instead of four, the same rounding
                grad_param = torch.full(param.shape, value, dtype=param.dtype, device=param.device)
        if not ctx.needs_input_grad[0]:
            grad_x = None
        return grad_x, grad_param, None, None, None, None, None, None, None, None


def _fake_quantize_per_channel(x: Tensor, param: Tensor, qmin, qmax, kind, k, offset, grad_factor, rounded_mask) -> Tensor:
    """
    :func:`fake_quantize_param` with one learned parameter per channel of dim 0 (``param`` of
    shape ``(x.shape[0],)``: a weight's output channels): the same grid and the same gradients,
    channel by channel: ``d x_hat / d x`` = 1 inside (unrounded value, or rounded with
    ``rounded_mask``), ``d x_hat / d s_c = (x_hat - x * inside) / s_c``, the parameter gradient
    times ``grad_factor``. Written with PyTorch ops (autograd through a straight-through round):
    it is used for weights, a small fraction of the tensors fake-quantized per iteration.
    """
    if param.dim() != 1 or param.numel() != x.shape[0]:
        raise ValueError(f"Per-channel parameters must have shape ({x.shape[0]},); got {tuple(param.shape)}.")
    if grad_factor != 1.0:  # the value of param, its gradient times grad_factor
        param = param * grad_factor + (param - param * grad_factor).detach()
    # the steps in float64, as the integer engine reads them (Quantizer.grid_step), then x's dtype
    step = step_from_param(param.double(), kind, k).to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
    v = x / step + offset
    rounded = torch.round(v)
    if not (torch.is_grad_enabled() and (x.requires_grad or param.requires_grad)):
        return (torch.clamp(rounded, qmin, qmax) - offset) * step  # the same values, no graph
    t = rounded if rounded_mask else v
    inside = (t >= qmin) & (t <= qmax)  # inclusive (torch.clamp's gradient is not at the ends)
    # inside: round(v), straight-through; outside: the clipped level, a constant in x
    eta = torch.where(inside, round_ste(v), torch.clamp(rounded, qmin, qmax).detach())
    return (eta - offset) * step


def fake_quantize_param(
    x: Tensor,
    param: Tensor,
    qmin: int,
    qmax: int,
    *,
    kind: str = "linear",
    k: float = 1.0,
    offset: float = 0.0,
    grad_factor: float = 1.0,
    rounded_mask: bool = False,
    save_output: bool = True,
) -> Tensor:
    """
    Fake-quantize ``x`` on the grid ``s * (eta - offset)``,
    ``eta = clip(round(x / s + offset), qmin, qmax)``, with straight-through gradients for
    ``x`` and for the learned ``param`` that gives the step ``s = step_from_param(param, kind,
    k)``.

    Args:
        x: input tensor.
        param: the learned parameter (LSQ step, LQ interval, TQT log2 threshold): 0-d, or one
            per channel of dim 0 (shape ``(x.shape[0],)``, per-channel weights).
        qmin, qmax: integer range of ``eta``.
        kind, k: ``"linear"`` (``s = max(|p| * k, eps)``) or ``"pow2"`` (``s = 2^(ceil(p) - k)``).
        offset: constant grid offset in steps (0, or ``(qmax - qmin) / 2`` for a zero-free grid).
        grad_factor: multiplies the step gradient (LSQ's ``1 / sqrt(N * Qp)``).
        rounded_mask: test the rounded instead of the unrounded value for the input gradient
            and for "clipped" in the step gradient (TQT) — see the module docstring.
        save_output: (eager ATen path) keep the output for the backward pass instead of
            recomputing it; only valid when no later op modifies the output in place.
    """
    if kind not in ("linear", "pow2"):
        raise ValueError(f"kind must be 'linear' or 'pow2'; got {kind!r}.")
    if param.numel() > 1:
        return _fake_quantize_per_channel(x, param, qmin, qmax, kind, k, offset, grad_factor, rounded_mask)
    # The output has x's shape and is not a view: an in-place op on it (a ReLU after a BN output
    # quantizer) is then an ordinary in-place op, not autograd's costly view + in-place path.
    return _FakeQuantizeSTE.apply(
        x, param, kind, float(k), int(qmin), int(qmax), float(offset),
        float(grad_factor), bool(rounded_mask), bool(save_output),
    )


def fake_quantize_ste(
    x: Tensor,
    step: Tensor,
    qmin: int,
    qmax: int,
    *,
    offset: float = 0.0,
    grad_factor: float = 1.0,
    rounded_mask: bool = False,
    save_output: bool = True,
) -> Tensor:
    """:func:`fake_quantize_param` with the step itself as the parameter (a positive 0-d
    tensor): ``x_hat = step * (clip(round(x / step + offset), qmin, qmax) - offset)``."""
    return fake_quantize_param(
        x, step, qmin, qmax, offset=offset, grad_factor=grad_factor, rounded_mask=rounded_mask,
        save_output=save_output,
    )
