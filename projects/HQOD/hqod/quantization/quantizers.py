"""
Learned-step fake quantizers, one class per method, in the ``QUANTIZERS`` registry:

* ``lsq``: LSQ (Esser et al., ICLR 2020) as written in HQOD Eq. 2-3 — learned step ``s``.
* ``tqt``: TQT (Jain et al., MLSys 2020) — learned ``log2`` threshold, power-of-two step.
* ``lq``: AQD's learned-interval quantizer (Chen et al., CVPR 2021, Eq. 2-3) — learned ``nu``.
* ``lsq_torch``: the speed/behaviour peer, PyTorch's fused learnable fake-quant op
  (``torch._fake_quantize_learnable_per_tensor_affine``, as MQBench and D2Go use it). Same
  forward as ``lsq``, but its input-gradient mask tests the rounded value.

Every quantizer is built as ``QUANTIZERS.get(name)(bits=b, signed=s)`` — per tensor — or, for a
weight, ``(bits=b, signed=s, granularity="channel", channels=C)``: one learned parameter per
output channel (dim 0), each initialized, searched and trained as the per-tensor one on its
channel (LSQ's gradient scale with N = the elements of one channel). It has

* ``forward(x)``: the fake-quantized tensor (or ``x`` itself when fake quantization is off);
* ``step``: the effective step size (a detached tensor);
* an observer ("calibration") mode that (re)initializes its parameter from the data it sees,
  averaging over calls, and a fake-quant switch — ``enable_observer``/``disable_observer``,
  ``enable_fake_quant``/``disable_fake_quant``. Calibration = observer on, fake-quant off;
* an ``initialized`` buffer: a quantizer never calibrated initializes itself from its first
  input; a checkpoint restores the flag so that a resumed run does not re-initialize.

Weights are signed; activations are unsigned when produced by a ReLU and signed otherwise
(``hqod.quantization.quantize_model`` decides). The grids, with ``b`` bits:

* signed: integers ``[-2^(b-1), 2^(b-1) - 1]`` times the step (LSQ, TQT);
* unsigned: integers ``[0, 2^b - 1]`` times the step (LSQ, TQT, LQ = AQD Eq. 2);
* LQ signed = AQD Eq. 3: ``2^b`` levels spread symmetrically over ``[-nu, nu]`` without a zero
  level (2-bit: ``{-nu, -nu/3, nu/3, nu}``).
"""
import dataclasses
import math
from numbers import Integral
from typing import Optional

import torch
from fvcore.common.registry import Registry
from torch import Tensor, nn

from .functional import STEP_EPS, _step_and_slope, fake_quantize_param, step_from_param
from .integer_layers import IntegerGrid

__all__ = [
    "QUANTIZERS",
    "NamedRegistry",
    "ALLOWED_BITS",
    "check_bits",
    "STEP_INITS",
    "GRANULARITIES",
    "Quantizer",
    "LSQQuantizer",
    "TQTQuantizer",
    "LQQuantizer",
    "TorchLSQQuantizer",
]

class NamedRegistry(Registry):
    """fvcore's Registry whose ``register`` also accepts an explicit name:
    ``@REG.register("lsq")`` (fvcore itself only registers under ``obj.__name__``)."""

    def register(self, obj=None):
        if isinstance(obj, str):
            name = obj

            def deco(cls):
                self._do_register(name, cls)
                return cls

            return deco
        return super().register(obj)


QUANTIZERS = NamedRegistry("QUANTIZERS")
QUANTIZERS.__doc__ = """
Registry of fake quantizers. A registered class is built as ``cls(bits=b, signed=s)`` and is a
:class:`Quantizer`.
"""

ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8)


def check_bits(bits, what: str = "bits") -> int:
    """Return ``bits`` if it is an int in 2..8; otherwise one ValueError that names ``what``, the
    allowed values and why the given one is refused."""
    if not isinstance(bits, bool) and isinstance(bits, Integral) and int(bits) in ALLOWED_BITS:
        return int(bits)
    if isinstance(bits, str):
        why = f"a string; write {what}={bits.strip()} without quotes" if bits.strip().isdigit() else "a string"
    elif isinstance(bits, bool) or not isinstance(bits, Integral):
        why = f"a {type(bits).__name__}"
    elif bits == 1:
        why = (
            "1 bit leaves no usable grid: signed 1-bit levels are {-1, 0} (no positive value) "
            "and binary networks need other quantizers"
        )
    elif bits < 1:
        why = "it has no quantization levels"
    else:
        why = "quantization here goes up to 8 bits; keep a layer FP32 with quant.overrides instead"
    allowed = f"{min(ALLOWED_BITS)}..{max(ALLOWED_BITS)}"
    raise ValueError(f"{what}={bits!r}: bit widths are ints in {allowed} ({why}).")


def _all_reduce_mean(t: Tensor) -> Tensor:
    """Average ``t`` over processes, so that every replica starts from the same parameters."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


STEP_INITS = ("mse", "paper", "minmax")
GRANULARITIES = ("tensor", "channel")
# The search of step_init="mse": steps 2^(k/8) times the quantizer's own initial step, from 1/8
# to 4 times it, on evenly strided elements of each row (at most MSE_SAMPLES_PER_ROW).
MSE_FACTORS = tuple(2.0 ** (k / 8) for k in range(-24, 17))
MSE_SAMPLES_PER_ROW = 1024


class Quantizer(nn.Module):
    """
    Base class: bit width, sign, integer range, modes and the observer logic. Subclasses define
    the learned parameter (:meth:`_param`), its data-driven initial value
    (:meth:`_initial_value`), the effective step (:meth:`_step`) and the quantization itself
    (:meth:`_fake_quantize`).
    """

    eps = STEP_EPS

    def __init__(
        self, *, bits: int, signed: bool, granularity: str = "tensor", channels: Optional[int] = None,
        step_init: str = "paper", save_output: bool = True,
    ):
        """``step_init``: how calibration sets the step (one of ``STEP_INITS``, read by
        :func:`~.calibration.calibrate`); ``save_output=False`` where a later op may modify the
        output in place (see :func:`~.functional.fake_quantize_ste`)."""
        super().__init__()
        if step_init not in STEP_INITS:
            raise ValueError(f"step_init must be one of {list(STEP_INITS)}; got {step_init!r}.")
        if not isinstance(signed, bool):
            raise ValueError(f"signed must be a bool; got {signed!r}.")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {list(GRANULARITIES)}; got {granularity!r}.")
        if (granularity == "channel") != (channels is not None) or (channels is not None and channels < 1):
            raise ValueError(
                f"A per-channel quantizer takes channels=<number of output channels> and a "
                f"per-tensor one none; got granularity={granularity!r}, channels={channels!r}."
            )
        self.granularity = granularity
        self.channels = channels
        self.bits = check_bits(bits)
        self.signed = signed
        if signed:
            self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            self.qmin, self.qmax = 0, 2**bits - 1
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
        self.fake_quant_enabled = True
        self.observer_enabled = False
        self.save_output = save_output
        self._num_observed = 0
        self._known_initialized = False  # cache of ``initialized`` (avoids a device sync per call)
        self.step_init = step_init
        self._search_base = self._search_errors = None  # the step search, while it runs

    # ---- modes ----
    def enable_fake_quant(self, enabled: bool = True):
        self.fake_quant_enabled = bool(enabled)
        return self

    def disable_fake_quant(self):
        return self.enable_fake_quant(False)

    def enable_observer(self, enabled: bool = True):
        """In observer mode every forward re-estimates the parameter from the input (running
        average over the calls since the observer was enabled) and marks it initialized."""
        self.observer_enabled = bool(enabled)
        self._num_observed = 0
        return self

    def disable_observer(self):
        return self.enable_observer(False)

    @property
    def is_initialized(self) -> bool:
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized.item())
        return self._known_initialized

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._known_initialized = False  # re-read the loaded flag on the next call
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def per_channel(self) -> bool:
        return self.channels is not None

    def _new_param(self, value: float) -> nn.Parameter:
        """The learned parameter: 0-d, or one per channel."""
        return nn.Parameter(torch.full((self.channels,) if self.per_channel else (), value))

    def _rows(self, x: Tensor) -> Tensor:
        """``x`` as (channels, elements per channel) for a per-channel quantizer."""
        if x.shape[0] != self.channels:
            raise ValueError(f"A per-channel quantizer of {self.channels} channels got a tensor of shape {tuple(x.shape)}.")
        return x.reshape(self.channels, -1)

    # ---- subclass interface ----
    def _param(self) -> nn.Parameter:
        raise NotImplementedError

    def _initial_value(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _range_value(self, amax: Tensor) -> Tensor:
        """The learned parameter of the grid whose largest level is ``amax`` (step_init
        "minmax", the plain min-max observer of post-training quantization)."""
        raise NotImplementedError

    def _step(self) -> Tensor:
        raise NotImplementedError

    def _fake_quantize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def step_value(self) -> float:
        """The step as the fake-quant kernels compute it from the learned parameter (a Python
        float, float64); per-tensor quantizers only (per channel: :meth:`grid_step`)."""
        raise NotImplementedError

    def _channel_steps(self) -> Tensor:
        """The steps of a per-channel quantizer, (C,) float64, as its forward computes them."""
        raise NotImplementedError

    def grid_step(self):
        """:meth:`step_value` (a float), or for a per-channel quantizer the (C,) float64 steps."""
        if self.per_channel:
            return self._channel_steps()
        return self.step_value()

    def integer_grid(self) -> IntegerGrid:
        """The output as integers times a scale (AQD Eq. 1), see :class:`IntegerGrid`; per
        channel, its ``step`` and ``scale`` are (C,) tensors."""
        return IntegerGrid(step=self.grid_step(), eta_min=self.qmin, eta_max=self.qmax)

    def clipped_integer_grid(self, upper: float) -> IntegerGrid:
        """:meth:`integer_grid` for inputs clipped at ``upper`` first (a ReLU6 before the
        quantizer): the top level lowered to the level this quantizer gives ``upper``, computed
        by its own float32 forward as the fake-quant model does. Rounding is monotone, so
        quantizing ``min(x, upper)`` onto the grid and ``x`` onto the clipped one give the same
        level for every ``x``."""
        grid = self.integer_grid()
        with torch.no_grad():
            x_hat = float(self._fake_quantize(torch.full((1, 1, 1, 1), float(upper), dtype=torch.float32)))
        level = round(x_hat / float(grid.step) + grid.offset2 / 2)
        return dataclasses.replace(grid, eta_max=min(grid.eta_max, level))

    # ---- shared logic ----
    @property
    def step(self) -> Tensor:
        """The effective step size: the distance between two adjacent levels."""
        return self._step().detach()

    def _lsq_init_step(self, x: Tensor) -> Tensor:
        """LSQ's initial step ``2 * mean|x| / sqrt(Qp)`` (Esser et al., Sec. 2.1), per channel
        for a per-channel quantizer."""
        mean_abs = self._rows(x).abs().mean(dim=1) if self.per_channel else x.abs().mean()
        return (2.0 * mean_abs / math.sqrt(self.qmax)).clamp_min(self.eps)

    def _grad_factor(self, x: Tensor) -> float:
        """LSQ's gradient scale ``1 / sqrt(N * Qp)``, N the elements sharing one step."""
        n = x.numel() // self.channels if self.per_channel else x.numel()
        return 1.0 / math.sqrt(n * self.qmax)

    def _scaled(self, value: Tensor, factor: float) -> Tensor:
        """The learned parameter of a step ``factor`` times that of ``value``."""
        return value * factor

    @torch.no_grad()
    def observe(self, x: Tensor):
        """Update the learned parameter from ``x`` by the quantizer's own rule
        (:meth:`_initial_value`, averaged over the calls since the observer was enabled and over
        processes) and mark the quantizer initialized."""
        x = x.detach().float()
        param = self._param()
        n = self._num_observed if self.observer_enabled else 0
        if self.step_init == "minmax":  # the running maximum of |x| (over processes too)
            amax = self._rows(x).abs().amax(dim=1) if self.per_channel else x.abs().amax()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX)
            value = self._range_value(amax.clamp_min(self.eps)).reshape(param.shape)
            param.copy_(value if n == 0 else torch.maximum(param.detach().float(), value))
        else:
            value = _all_reduce_mean(self._initial_value(x))
            param.copy_(((param.detach().float() * n + value.reshape(param.shape)) / (n + 1)))
        self._num_observed = n + 1
        self.initialized.fill_(1)
        self._known_initialized = True

    # ---- the step search of step_init="mse" (a second calibration pass) ----
    def start_step_search(self):
        """From now on every input adds, for each step in :data:`MSE_FACTORS` times the
        current one, its squared quantization error (:meth:`finish_step_search` picks)."""
        self._search_base = self._param().detach().clone()
        self._search_errors = None

    @torch.no_grad()
    def _accumulate_search(self, x: Tensor):
        if isinstance(x, nn.Parameter) and self._search_errors is not None:
            return  # a weight, which calibration does not change: its errors are counted
        # the same elements of each row (image, or output channel) whatever the batching, so
        # that N processes sum the errors of one process with N times their batch
        rows = x.detach().float().reshape(x.shape[0] if x.dim() > 1 else 1, -1)
        rows = rows[:, :: -(-rows.shape[1] // MSE_SAMPLES_PER_ROW)]
        param = self._param()
        errors = []
        try:
            for factor in MSE_FACTORS:
                param.copy_(self._scaled(self._search_base, factor).reshape(param.shape))
                sq = (self._fake_quantize(rows) - rows).pow(2)
                errors.append(sq.sum(dim=1) if self.per_channel else sq.sum())  # per channel: (C,)
        finally:
            param.copy_(self._search_base)
        errors = torch.stack(errors).double()
        self._search_errors = errors if self._search_errors is None else self._search_errors + errors

    @torch.no_grad()
    def finish_step_search(self):
        """Set the step of least summed squared error (over processes too); a quantizer that
        saw no input keeps its step. Every process must call it (a collective)."""
        param = self._param()
        num_errors = len(MSE_FACTORS) * param.numel()
        totals = torch.zeros(num_errors + 1, dtype=torch.float64, device=param.device)
        if self._search_errors is not None:
            totals[:-1] = self._search_errors.flatten()
            totals[-1] = 1  # this process saw input
        totals = _all_reduce_mean(totals)
        if totals[-1] > 0:
            best = totals[:-1].reshape(len(MSE_FACTORS), -1).argmin(dim=0)  # per channel
            if self.per_channel:
                factors = torch.tensor(MSE_FACTORS, dtype=param.dtype, device=param.device)[best]
            else:
                factors = MSE_FACTORS[int(best)]
            param.copy_(self._scaled(self._search_base, factors).reshape(param.shape))
        self._search_base = self._search_errors = None

    def forward(self, x: Tensor) -> Tensor:
        if self._search_base is not None:
            self._accumulate_search(x)
        elif self.observer_enabled or (self.fake_quant_enabled and not self.is_initialized):
            self.observe(x)
        if not self.fake_quant_enabled:
            return x
        return self._fake_quantize(x)

    def _granularity_repr(self) -> str:
        return f", per channel ({self.channels})" if self.per_channel else ""

    def extra_repr(self):
        return (
            f"bits={self.bits}, signed={self.signed}, range=[{self.qmin}, {self.qmax}]{self._granularity_repr()}, "
            f"fake_quant={self.fake_quant_enabled}, observer={self.observer_enabled}"
        )


@QUANTIZERS.register("lsq")
class LSQQuantizer(Quantizer):
    """
    LSQ, HQOD Eq. 2-3: ``x_hat = s * clip(round(x / s), Nmin, Nmax)``. The input gradient passes
    where ``Nmin <= x / s <= Nmax`` on the unrounded value (Eq. 3); the step gradient is
    ``round(x/s) - x/s`` inside and ``Nmin``/``Nmax`` outside, scaled by LSQ's
    ``g = 1 / sqrt(N * Qp)`` with ``N = x.numel()`` and ``Qp = Nmax``. Initial step
    ``2 * mean|x| / sqrt(Qp)`` from the first batch or the calibration data.
    """

    def __init__(self, *, bits: int, signed: bool, **options):
        super().__init__(bits=bits, signed=signed, **options)
        self.scale = self._new_param(1.0)

    def _param(self):
        return self.scale

    def _initial_value(self, x):
        return self._lsq_init_step(x)

    def _range_value(self, amax):
        return amax / self.qmax

    def _step(self):
        return step_from_param(self.scale, "linear", 1.0)

    def step_value(self):
        return float(_step_and_slope(self.scale.detach(), "linear", 1.0)[0])

    def _channel_steps(self):
        return step_from_param(self.scale.detach().double(), "linear", 1.0)

    def _fake_quantize(self, x):
        return fake_quantize_param(
            x, self.scale, self.qmin, self.qmax, grad_factor=self._grad_factor(x),
            save_output=self.save_output,
        )


@QUANTIZERS.register("tqt")
class TQTQuantizer(Quantizer):
    """
    TQT (Jain et al., "Trained quantization thresholds", Eq. 5-8): the learned parameter is
    ``log2 t`` of the threshold ``t``; the step ``s = 2^ceil(log2 t) / 2^(b-1)`` (signed) or
    ``/ 2^b`` (unsigned) is always a power of two, the ceil being straight-through. Gradients as
    in the paper: the input gradient passes where ``n <= round(x/s) <= p`` (rounded value) and
    ``d x_hat / d log2 t = s * ln 2 * (round(x/s) - x/s)`` inside, ``s * ln 2 * n`` or
    ``s * ln 2 * p`` when clipped; no gradient scaling. Initial threshold: TQT's "3SD"
    calibration, ``t = min(max|x|, 3 * rms(x))``.
    """

    def __init__(self, *, bits: int, signed: bool, **options):
        super().__init__(bits=bits, signed=signed, **options)
        self.log2_threshold = self._new_param(0.0)
        self._log2_levels = bits - 1 if signed else bits

    def _param(self):
        return self.log2_threshold

    def _initial_value(self, x):
        if self.per_channel:
            rows = self._rows(x)
            t = torch.minimum(rows.abs().amax(dim=1), 3.0 * rows.pow(2).mean(dim=1).sqrt())
        else:
            t = torch.minimum(x.abs().max(), 3.0 * x.pow(2).mean().sqrt())
        return torch.log2(t.clamp_min(self.eps))

    def _range_value(self, amax):
        return torch.log2(amax)  # the threshold t = max|x|

    def _scaled(self, value, factor):
        return value + (torch.log2(factor) if isinstance(factor, Tensor) else math.log2(factor))

    def _step(self):
        return step_from_param(self.log2_threshold, "pow2", self._log2_levels)

    def step_value(self):
        return float(_step_and_slope(self.log2_threshold.detach(), "pow2", self._log2_levels)[0])

    def _channel_steps(self):
        return step_from_param(self.log2_threshold.detach().double(), "pow2", self._log2_levels)

    def _fake_quantize(self, x):
        return fake_quantize_param(
            x, self.log2_threshold, self.qmin, self.qmax, kind="pow2", k=self._log2_levels,
            rounded_mask=True, save_output=self.save_output,
        )


@QUANTIZERS.register("lq")
class LQQuantizer(Quantizer):
    """
    AQD's learned-interval quantizer with straight-through rounding, ``L = 2^b - 1``:

    * unsigned (activations after ReLU), AQD Eq. 2:
      ``eta = round(clip(x / nu, 0, 1) * L)``, ``x_hat = eta * nu / L`` — ``[0, nu]`` on L steps;
    * signed (weights, and activations not produced by a ReLU), AQD Eq. 3:
      ``eta = round((clip(x / nu, -1, 1) + 1) / 2 * L)``, ``x_hat = (2 * eta / L - 1) * nu`` —
      ``2^b`` levels on ``[-nu, nu]`` without a zero level.

    Gradients are those of these formulas with a straight-through round (as the official code
    computes them by autograd): the input gradient passes where ``x`` is inside the interval
    (unrounded); LSQ's gradient scale is not used (as AQD's detection configs). The official code
    also standardizes weights before quantizing; the paper does not, neither do we. Initial
    ``nu``: the interval whose step equals LSQ's initial step (AQD used 1.0 or a warm-up).
    """

    def __init__(self, *, bits: int, signed: bool, **options):
        super().__init__(bits=bits, signed=signed, **options)
        self.interval = self._new_param(1.0)
        self._levels = 2**bits - 1  # L
        # The zero-free signed grid has the step 2 nu / L and is offset by half the range.
        self._step_per_nu = (2.0 if signed else 1.0) / self._levels

    def _param(self):
        return self.interval

    def _initial_value(self, x):
        return self._lsq_init_step(x) / self._step_per_nu

    def _range_value(self, amax):
        return amax  # the interval [0, nu] or [-nu, nu]

    def _step(self):
        return step_from_param(self.interval, "linear", self._step_per_nu)

    def step_value(self):
        return float(_step_and_slope(self.interval.detach(), "linear", self._step_per_nu)[0])

    def _channel_steps(self):
        return step_from_param(self.interval.detach().double(), "linear", self._step_per_nu)

    def integer_grid(self):
        # eta in [0, L]; signed: offset L / 2 (Eq. 3), so q = 2 * eta - L (odd), scale nu / L
        return IntegerGrid(
            step=self.grid_step(), eta_min=0, eta_max=self._levels,
            offset2=self._levels if self.signed else 0,
        )

    def _fake_quantize(self, x):
        offset = self._levels / 2.0 if self.signed else 0.0
        return fake_quantize_param(
            x, self.interval, 0, self._levels, k=self._step_per_nu, offset=offset,
            save_output=self.save_output,
        )

    def extra_repr(self):
        grid = "AQD Eq. 3 (symmetric, no zero)" if self.signed else "AQD Eq. 2 ([0, nu])"
        return f"bits={self.bits}, signed={self.signed}, grid={grid}{self._granularity_repr()}, " + (
            f"fake_quant={self.fake_quant_enabled}, observer={self.observer_enabled}"
        )


@QUANTIZERS.register("lsq_torch")
class TorchLSQQuantizer(Quantizer):
    """
    The peer implementation of LSQ: PyTorch's fused learnable fake-quant op with
    ``grad_factor = 1 / sqrt(N * Qp)``. Same forward and initialization as ``lsq``; its
    gradients test the ROUNDED value ``Nmin <= round(x/s) <= Nmax`` (so it differs from HQOD
    Eq. 3 where ``x/s`` lies within half a step outside the range). Kept for comparison.
    """

    def __init__(self, *, bits: int, signed: bool, **options):
        super().__init__(bits=bits, signed=signed, **options)
        self.scale = nn.Parameter(torch.ones(self.channels or 1))
        self.register_buffer("zero_point", torch.zeros(self.channels or 1))

    def _param(self):
        return self.scale

    def _initial_value(self, x):
        return self._lsq_init_step(x)

    def _range_value(self, amax):
        return amax / self.qmax

    def _step(self):
        step = step_from_param(self.scale, "linear", 1.0)
        return step if self.per_channel else step.reshape(())

    def step_value(self):
        # the fused op takes the float32 scale tensor as it is
        return float(self.scale.detach().abs().clamp_min(self.eps))

    def _channel_steps(self):
        return self.scale.detach().abs().clamp_min(self.eps).double()

    def _fake_quantize(self, x):
        scale = self.scale.abs().clamp_min(self.eps)
        if self.per_channel:
            return torch._fake_quantize_learnable_per_channel_affine(
                x, scale, self.zero_point, 0, self.qmin, self.qmax, self._grad_factor(x)
            )
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, scale, self.zero_point, self.qmin, self.qmax, self._grad_factor(x)
        )
