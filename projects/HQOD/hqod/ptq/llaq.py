"""
Reg-PTQ's learnable logarithmic-affine quantizer (LLAQ) for the weights of the regression
branch, whose distribution is roughly Laplacian around a location ``mu``.

The paper gives the idea (split at ``mu``, map each side with ``psi(m) = k * log(m) + a``, four
learnable parameters ``k+, a+, k-, a-``, quantize ``psi`` uniformly, map back) but not the
details; ours (../shared/notes/regptq.md):

* ``mu``: the median of the weight tensor (a buffer, set once from the weight);
  ``d = w - mu``, side ``sign(d)``, magnitude ``m = |d|``.
* Codes: a ``b``-bit signed code ``q`` in ``[-2^(b-1), 2^(b-1) - 1]``; ``q = 0`` is ``mu``,
  the positive side has ``L+ = 2^(b-1) - 1`` levels, the negative ``L- = 2^(b-1)``.
* Per side, ``j = clamp(round(k * log(m) + a), 0, L)``; ``w_hat = mu + sign(d) *
  exp((j - a) / k)`` for ``j >= 1``, ``mu`` for ``j = 0``: levels ``exp((j - a) / k)`` are
  geometric with ratio ``exp(1 / k)``, denser near ``mu``.
* Gradients: the code ``j`` is held constant for ``k`` and ``a`` (as LSQ holds ``round(x/s)``),
  so ``d w_hat / d a = -sign(d) * m_hat / k`` and ``d w_hat / d k = -sign(d) * m_hat * (j - a)
  / k^2`` on ``j >= 1``, 0 on ``j = 0``; the weight's gradient passes straight through where
  ``psi(m) <= L + 1/2`` (not clipped above).
* Initialization: per side (and per channel), the ratio between levels and the largest level
  searched together for the least squared error: ratios ``2^(i/8)``, ``i = 1..16`` (``k = 1 /
  ln(ratio)``), the largest level between 1/4 and 1 times the side's largest magnitude. A ratio
  fixed at 2 (levels powers of two) left RetinaNet-R18's regression tower at 4 bits with 2.7x
  the squared error of the per-channel uniform grid; searched, 1.1x, and at 2 and 3 bits as low
  as the uniform grid's or lower (BENCHMARKS.md, issue 16). Any ratio is a fixed-point
  multiplier per level at inference (the paper's integer multiply and shift).
* Granularity: that of the uniform weight quantizer it replaces (:func:`use_llaq`): per output
  channel (``mu`` and the four parameters per channel, as a per-channel uniform quantizer has a
  step per channel) or per tensor. The paper does not say; one set per tensor cost RetinaNet-R18
  W4A4 3 AP against the per-channel uniform head (BENCHMARKS.md, issue 16).
* Rounding: nearest in ``psi``; PTQ's reconstruction learns it instead, between each weight's
  two neighbouring levels (``hqod.ptq.reconstruct.AdaRoundLLAQ``, as AdaRound does on a uniform
  grid; with nearest rounding kept, RetinaNet-R18 W2A4 Reg-PTQ reached 24.8 AP, 49.3 learned).

The levels are not uniform: the integer-only engine (uniform grids) refuses LLAQ layers.
"""
import math
from fnmatch import fnmatchcase
from typing import Iterable, List

import torch
from torch import Tensor, nn

from hqod.quantization import QConv2d, Quantizer

__all__ = ["LLAQQuantizer", "use_llaq", "default_llaq_layers", "level", "log_code"]

_SEARCH = tuple(2.0 ** (-k / 8) for k in range(0, 17))  # largest level / max|d|, 1 .. 1/4
_RATIOS = tuple(2.0 ** (i / 8) for i in range(1, 17))  # between neighbouring levels, 1.09 .. 4


def level(j: Tensor, k: Tensor, a: Tensor) -> Tensor:
    """The magnitude of code ``j`` (0 for ``j = 0``): ``exp((j - a) / k)``."""
    return torch.where(j >= 1, torch.exp((j - a) / k), torch.zeros_like(j))


def log_code(m: Tensor, k: Tensor, a: Tensor) -> Tensor:
    """``psi(m) = k log(m) + a``, the real-valued code of magnitude ``m``."""
    return k * torch.log(m.clamp_min(1e-30)) + a


def _side_value(m: Tensor, k: Tensor, a: Tensor, levels: int):
    """The quantized magnitudes of one side (autograd w.r.t. k and a) and the mask where the
    input's gradient passes."""
    psi = log_code(m, k, a)
    j = psi.detach().round().clamp(0, levels)
    return level(j, k, a), psi.detach() <= levels + 0.5


class LLAQQuantizer(Quantizer):
    """LLAQ on a weight tensor (see the module docstring); ``bits`` 2..8, signed."""

    def __init__(self, *, bits: int, signed: bool = True, **options):
        super().__init__(bits=bits, signed=True, step_init="paper", **options)
        self.register_buffer("mu", torch.zeros((self.channels,) if self.per_channel else ()))
        self.k_pos, self.a_pos = self._new_param(1.0 / math.log(2.0)), self._new_param(0.0)
        self.k_neg, self.a_neg = self._new_param(1.0 / math.log(2.0)), self._new_param(0.0)
        self.levels_pos, self.levels_neg = self.qmax, -self.qmin
        self._observed = None  # (weight, state) of the last observe(): calibration calls it per forward

    def _state(self):
        return (self.mu, self.k_pos, self.a_pos, self.k_neg, self.a_neg)

    def _param(self):
        return self.a_pos

    def parameters_for(self, x: Tensor):
        """``mu, k_pos, a_pos, k_neg, a_neg`` broadcastable to the weight ``x``: per channel,
        those of output channel ``c`` on ``x[c]``."""
        params = self._state()
        if self.per_channel:
            view = (-1,) + (1,) * (x.dim() - 1)
            params = tuple(t.view(view) for t in params)
        return params

    def _fake_quantize(self, x: Tensor) -> Tensor:
        mu, k_pos, a_pos, k_neg, a_neg = self.parameters_for(x)
        d = x - mu
        m = d.abs()
        pos, pos_pass = _side_value(m, k_pos, a_pos, self.levels_pos)
        neg, neg_pass = _side_value(m, k_neg, a_neg, self.levels_neg)
        positive = d >= 0
        value = torch.where(positive, pos, -neg)
        passes = torch.where(positive, pos_pass, neg_pass)
        return mu + value + (x - x.detach()) * passes

    @torch.no_grad()
    def observe(self, x: Tensor):
        """Set ``mu`` and the four parameters from the weight, per channel or per tensor
        (deterministic: the same weight gives the same state, so repeated calls change
        nothing, and a call on the weight and state it left returns at once)."""
        seen = self._observed
        if (
            seen is not None
            and (seen[0].shape, seen[0].device) == (x.shape, x.device)
            and all(map(torch.equal, seen, (x.detach(),) + self._state()))
        ):
            return
        rows = x.detach().float()
        rows = self._rows(rows) if self.per_channel else rows.reshape(1, -1)
        mu = rows.median(dim=1).values  # (rows,)
        d = rows - mu[:, None]
        params = {}
        for side, mask, levels in (("pos", d >= 0, self.levels_pos), ("neg", d < 0, self.levels_neg)):
            m = d.abs() * mask
            top = m.amax(dim=1)
            top = torch.where(top > 0, top, torch.ones_like(top))  # an empty side: any grid
            best_err = best_k = best_a = None
            for ratio in _RATIOS:
                k = torch.full_like(top, 1.0 / math.log(ratio))
                for factor in _SEARCH:
                    # the largest level exp((L - a) / k) = factor * top
                    a = levels - k * torch.log((factor * top).clamp_min(1e-12))
                    value, _ = _side_value(m, k[:, None], a[:, None], levels)
                    err = ((value - m).pow(2) * mask).sum(dim=1)
                    if best_err is None:
                        best_err, best_k, best_a = err, k, a
                    else:
                        better = err < best_err
                        best_err = torch.where(better, err, best_err)
                        best_k, best_a = torch.where(better, k, best_k), torch.where(better, a, best_a)
            params[side] = best_k, best_a
        shape = self.mu.shape
        self.mu.copy_(mu.reshape(shape))
        for side in ("pos", "neg"):
            k, a = params[side]
            getattr(self, f"k_{side}").copy_(k.reshape(shape)), getattr(self, f"a_{side}").copy_(a.reshape(shape))
        self.initialized.fill_(1)
        self._known_initialized = True
        self._observed = tuple(t.detach().clone() for t in (x,) + self._state())

    def start_step_search(self):  # its own search runs in observe()
        pass

    def finish_step_search(self):
        pass

    # a uniform grid's step, integer grid and per-channel steps do not exist for LLAQ
    def integer_grid(self):
        raise ValueError(
            "LLAQ (ptq.head_quantizer='llaq') has non-uniform levels, which the integer-only "
            "engine and the uniform Q/DQ export cannot represent; calibrate with "
            "ptq.head_quantizer='uniform' to export."
        )

    step_value = grid_step = integer_grid

    @property
    def step(self) -> Tensor:
        return self.integer_grid()

    def extra_repr(self):
        return (
            f"LLAQ bits={self.bits}, levels +{self.levels_pos}/-{self.levels_neg}{self._granularity_repr()}, "
            f"fake_quant={self.fake_quant_enabled}"
        )


def default_llaq_layers(model: nn.Module) -> List[str]:
    """The regression branch of every declared dense head: the convs of the tower that feeds
    ``bbox_pred`` and ``bbox_pred`` itself."""
    from hqod.quantization.quantize import _head_spec

    names = []
    for name, m in model.named_modules():
        spec = _head_spec(m)
        if spec is None or "bbox_pred" not in spec.predictors:
            continue
        prefix = f"{name}." if name else ""
        tower = spec.predictors["bbox_pred"]
        names += [f"{prefix}{tower}.{n}" for n, c in getattr(m, tower).named_children() if isinstance(c, nn.Conv2d)]
        names.append(f"{prefix}bbox_pred")
    return names


def use_llaq(model: nn.Module, patterns: Iterable[str] = None) -> List[str]:
    """Give the quantized convs named by ``patterns`` (globs; None: :func:`default_llaq_layers`)
    an LLAQ weight quantizer of their weight bits and granularity, in place. Returns their
    names."""
    names = default_llaq_layers(model) if patterns is None else None
    done = []
    for name, m in model.named_modules():
        if not isinstance(m, QConv2d):
            continue
        if (names is not None and name in names) or (names is None and any(fnmatchcase(name, p) for p in patterns)):
            old = m.weight_quant
            llaq = LLAQQuantizer(bits=old.bits, granularity=old.granularity, channels=old.channels)
            m._init_weight_quant(llaq.to(m.weight.device))
            done.append(name)
    if not done:
        raise ValueError(
            f"ptq.head_quantizer='llaq': no quantized conv matches ptq.llaq_layers={list(patterns) if patterns else None} "
            "(None: the regression tower and bbox_pred of a declared dense head)."
        )
    return done
