"""
Block / layer reconstruction (AdaRound, BRECQ, QDrop, Reg-PTQ) on a quantized dense detector.

Units, in the model's order: with block granularity the backbone's stem and residual blocks,
then every quantized conv / linear layer outside them (neck and head: layer-wise); with layer
granularity every quantized layer. For each unit:

1. cached: its FP32 inputs and outputs (the FP32 model, BN folded, on the calibration images),
   the squared gradient of the detection loss at those outputs (``fisher``, BRECQ's diagonal
   Fisher; the calibration images are training images, so their boxes give the loss), and the
   unit's inputs in the quantized model as the units before it left it;
2. optimized for ``iters`` steps, one cached sample per step: AdaRound's rounding variables of
   its weights (the weight steps fixed; on LLAQ's grid :class:`AdaRoundLLAQ`), the steps of its
   activation quantizers and LLAQ's parameters, with Adam, on

       sum_channels(F * (O_hat - O)^2), averaged over the batch and the output positions
       + round_weight * sum_weights(1 - |2h(V) - 1|^beta)  [+ the global term]

   (BRECQ's and QDrop's normalization, ``.sum(1).mean()`` on (N, C, H, W): the relative weight
   of the regularizer matters. Summed over the positions too, the error of a 32 x 32 window
   outweighed the regularizer 1,024 times more than in BRECQ, the rounding variables were not
   driven to 0 or 1, and making them hard undid the reconstruction: BENCHMARKS.md, issue 16),

   ``F`` the Fisher weight normalized to mean 1 over the unit (1 without ``fisher``), beta
   annealed from 20 to 2 after the warm-up; QDrop: each activation quantizer of the unit and
   the unit's input keep their FP32 value with probability ``drop_prob``;
3. the rounding made hard and written into the weight (on its grid, so that the model's own
   quantizer reproduces it exactly).

Our choices for two CPU cores (the papers run 2,000-20,000 steps of 32 images on a GPU):

* **windows** (``ptq.window``): a sample is one call of the unit (a batch of images; one
  pyramid level in the head) cropped to a ``window`` x ``window`` window of its output, placed
  at random per call, with the input crop that computes it plus ``WINDOW_MARGIN`` output pixels
  of context that are computed but not compared. Neighbouring positions of a feature map say
  much the same; the crops divide the caches' memory and a step's cost by the map's area over
  the window's. Each unit's first window is checked against its whole-map output (a unit
  whose receptive field the margin does not cover uses whole maps). ``window=0``: whole maps.
* **replay**: a unit's quantized inputs come from one pass of the quantized model in which
  every finished module (the largest whose units are all reconstructed) returns the outputs it
  had in an earlier pass instead of computing them, so that the pass costs only the layers
  between the finished modules and the unit.
* Reg-PTQ's global term (``hqod.ptq.global_loss``) is computed exactly where the unit is a
  head predictor (its output is the head output); for the other units it enters through the
  Fisher weight: ``F = g_det^2 + g_glob^2`` with ``g_glob`` the gradient of the global loss at
  the unit's output in the quantized model, taken in one pass per group of cached units,
  before the group is reconstructed (its diagonal Gauss-Newton form). Exact everywhere would
  cost a forward and backward pass of the rest of the detector per step.
"""
import logging
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.utils.events import EventStorage

from detectron2.layers import FrozenBatchNorm2d

from hqod.quantization import (
    LQQuantizer, MultiLevelBatchNorm, QConv2d, QLinear, Quantizer, cached_quantized_weights,
)
from hqod.quantization.quantize import _head_spec

from .config import PTQConfig
from .global_loss import global_loss
from .llaq import LLAQQuantizer, level, log_code

__all__ = ["AdaRoundWeight", "AdaRoundLLAQ", "reconstruction_units", "reconstruct", "detector_forward"]

logger = logging.getLogger(__name__)

BLOCK_TYPES = (BasicStem, BasicBlock, BottleneckBlock)
_LAYERS = (QConv2d, QLinear)
WINDOW_MARGIN = 4  # output pixels of context on each side of a window, computed, not compared


class AdaRoundWeight(nn.Module):
    """AdaRound (Nagel et al., ICML 2020) on the grid of a uniform weight quantizer:
    ``s * clamp(floor(w / s) + h(V), qmin, qmax)`` with the rectified sigmoid
    ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, ``V`` initialized so that
    ``h(V)`` is the fractional part of ``w / s``; ``hard`` rounds up where ``V >= 0``."""

    zeta, gamma = 1.1, -0.1

    def __init__(self, base: Quantizer, weight: Tensor):
        super().__init__()
        step = base.step.to(weight.dtype)
        self.register_buffer("scale", step.reshape(-1, *([1] * (weight.dim() - 1))) if step.dim() else step)
        self.qmin, self.qmax = base.qmin, base.qmax
        rest = (weight.detach() / self.scale) - torch.floor(weight.detach() / self.scale)
        p = ((rest - self.gamma) / (self.zeta - self.gamma)).clamp(1e-4, 1 - 1e-4)
        self.V = nn.Parameter(torch.log(p / (1 - p)))
        self.hard = False

    def h(self) -> Tensor:
        return (torch.sigmoid(self.V) * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)

    def forward(self, w: Tensor) -> Tensor:
        up = (self.V >= 0).to(w.dtype) if self.hard else self.h()
        return self.scale * torch.clamp(torch.floor(w.detach() / self.scale) + up, self.qmin, self.qmax)

    def regularizer(self, beta: float) -> Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


class AdaRoundLLAQ(AdaRoundWeight):
    """AdaRound on LLAQ's geometric grid (our extension: Reg-PTQ builds on QDrop, whose weight
    rounding is learned, and leaves LLAQ's open): per side, a magnitude ``m = |w - mu|``
    between two neighbouring levels, ``level(lo) <= m < level(lo + 1)`` with ``lo = clamp(
    floor(k log m + a), 0, L)`` (``level(0) = 0``), becomes ``level(lo) + h(V) (level(lo + 1) -
    level(lo))``, ``V`` initialized so that this is ``m``. LLAQ's ``k`` and ``a`` stay
    learnable, the codes ``lo`` fixed (as AdaRound holds ``floor(w / s)`` with the step);
    ``hard`` rounds up where ``V >= 0``, a weight LLAQ itself then maps to the same code."""

    def __init__(self, base: LLAQQuantizer, weight: Tensor):
        nn.Module.__init__(self)
        object.__setattr__(self, "base", base)  # not a submodule: its parameters stay the quantizer's
        w = weight.detach()
        mu = base.parameters_for(w)[0]
        self.register_buffer("positive", (w - mu) >= 0)  # the side of each weight (mu is fixed)
        _, k, a = self._side_parameters(w)
        top = torch.where(self.positive, float(base.levels_pos), float(base.levels_neg))
        m = (w - mu).abs()
        with torch.no_grad():
            lo = torch.minimum(log_code(m, k, a).floor().clamp_min(0), top)
            hi = torch.minimum(lo + 1, top)
            low, high = level(lo, k, a), level(hi, k, a)
            rest = torch.where(hi > lo, (m - low) / (high - low).clamp_min(1e-30), torch.zeros_like(m))
        self.register_buffer("lo", lo)
        self.register_buffer("hi", hi)
        p = ((rest - self.gamma) / (self.zeta - self.gamma)).clamp(1e-4, 1 - 1e-4)
        self.V = nn.Parameter(torch.log(p / (1 - p)))
        self.hard = False

    def _side_parameters(self, w: Tensor):
        """LLAQ's ``mu`` and the ``k`` and ``a`` of each weight's side."""
        mu, k_pos, a_pos, k_neg, a_neg = self.base.parameters_for(w)
        return mu, torch.where(self.positive, k_pos, k_neg), torch.where(self.positive, a_pos, a_neg)

    def forward(self, w: Tensor) -> Tensor:
        mu, k, a = self._side_parameters(w)
        up = (self.V >= 0).to(w.dtype) if self.hard else self.h()
        low, high = level(self.lo, k, a), level(self.hi, k, a)
        value = low + up * (high - low)
        return mu + torch.where(self.positive, value, -value)


def _uniform_grid(q: Quantizer) -> bool:
    """A grid ``step * integer`` with a zero level (LSQ, TQT), which AdaRound rounds on."""
    return q.fake_quant_enabled and q.is_initialized and not isinstance(q, (LLAQQuantizer, LQQuantizer))


def reconstruction_units(model: nn.Module, block_wise: bool) -> List[str]:
    """The names of the units reconstructed one after the other (see the module docstring)."""
    modules = dict(model.named_modules())
    blocks = []
    if block_wise:
        backbone_names = [n for n in modules if n.split(".")[0] == "backbone"]
        for name in backbone_names:
            m = modules[name]
            if isinstance(m, BLOCK_TYPES) and any(isinstance(c, _LAYERS) for c in m.modules()):
                blocks.append(name)
    units = []
    for name, m in modules.items():
        if name in blocks:
            units.append(name)
        elif isinstance(m, _LAYERS) and not any(name.startswith(b + ".") for b in blocks):
            units.append(name)
    return units


def detector_forward(model: DenseDetector, batch, *, losses: bool = False, image_grad: bool = False):
    """The dense detector's network on a batch, without post-processing: ``(predictions,
    anchors, losses or None)``; ``image_grad``: the normalized images require grad, so that
    gradients reach every intermediate output (the model's parameters need not)."""
    images = model.preprocess_image(batch)
    x = images.tensor.requires_grad_(True) if image_grad else images.tensor
    features = model.backbone(x)
    features = [features[f] for f in model.head_in_features]
    predictions = model.head(features)
    anchors = model.anchor_generator(features)
    loss = None
    if losses:
        gt = [d["instances"].to(x.device) for d in batch]
        loss = model.forward_training(images, features, predictions, gt)
    return predictions, anchors, loss


class _Stop(Exception):
    pass


@dataclass(frozen=True)
class _Window:
    """Where one sample lies in a call's ``(N, C, H, W)`` input and output (pairs of slices,
    rows then columns): the input crop ``inp``, the compared output region ``out``, and that
    region inside the output of the cropped input, ``inner``."""

    inp: Tuple[slice, slice]
    out: Tuple[slice, slice]
    inner: Tuple[slice, slice]


def _crop(t, region):
    return t if region is None or not isinstance(t, Tensor) or t.dim() != 4 else t[..., region[0], region[1]]


def _choose_window(in_shape, out_shape, size: int, key: str) -> Optional[_Window]:
    """A ``size`` x ``size`` window of the output placed by ``key`` (the same in every pass of
    the same call), its input crop with ``WINDOW_MARGIN`` output pixels of context on each
    side; None (whole maps) for a map no larger than the window or a unit that is not a
    strided map-to-map function."""
    if size <= 0 or len(in_shape) != 4 or len(out_shape) != 4:
        return None
    (h_in, w_in), (h, w) = in_shape[-2:], out_shape[-2:]
    if h <= size and w <= size:
        return None
    stride = round(h_in / h)
    if stride < 1 or round(w_in / w) != stride:
        return None
    rng = random.Random(key)
    inp, out, inner = [], [], []
    for n_in, n_out in ((h_in, h), (w_in, w)):
        length = min(size, n_out)
        start = rng.randrange(n_out - length + 1)
        first = max(0, start - WINDOW_MARGIN)  # output row of the crop's first input row
        inp.append(slice(first * stride, min(n_in, (start + length + WINDOW_MARGIN) * stride)))
        out.append(slice(start, start + length))
        inner.append(slice(start - first, start - first + length))
    return _Window(tuple(inp), tuple(out), tuple(inner))


def _crop_args(args, win: Optional[_Window]):
    """The unit's call arguments cropped to the window's input, detached copies."""
    return tuple(_crop(a, win and win.inp).detach().clone() if isinstance(a, Tensor) else a for a in args)


@dataclass
class _Cache:
    """A unit's samples, one per sampled call (``keep``: the calls sampled, None: all; ``calls``:
    each sample's call, counted over the calibration batches): its window, FP32 inputs (QDrop)
    and outputs, squared loss gradients at the outputs, and inputs in the quantized model."""

    keep: Optional[frozenset] = None
    calls: List[int] = field(default_factory=list)
    windows: List[Optional[_Window]] = field(default_factory=list)
    fp_in: List[tuple] = field(default_factory=list)
    fp_out: List[Tensor] = field(default_factory=list)
    grad_sq: List[Tensor] = field(default_factory=list)
    q_in: List[tuple] = field(default_factory=list)

    def sampled(self, call: int) -> bool:
        return self.keep is None or call in self.keep

    def window(self, k: int) -> Optional[_Window]:
        return self.windows[k] if self.windows else None

    def output(self, unit: nn.Module, k: int, args) -> Tensor:
        """The unit's output on ``args`` (sample ``k``'s input), in the sample's window."""
        out = unit(*args)
        win = self.window(k)
        return out if win is None else _crop(out, win.inner)


def _eval_norms(model):
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, MultiLevelBatchNorm, FrozenBatchNorm2d)):
            m.eval()


def _clone(x, grad: bool = False):
    if isinstance(x, Tensor):
        return x.detach().clone().requires_grad_(grad and x.is_floating_point())
    if isinstance(x, dict):
        return {k: _clone(v, grad) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v, grad) for v in x)
    return x


class _Replay(nn.Module):
    """Stands in for a finished module in the passes of the quantized model: returns, call by
    call, the outputs it had on batch ``batch`` (copies, which the layers after it may change
    in place; requiring grad when grad is enabled, so that gradients reach the layers after),
    and the module's attributes (e.g. a backbone's ``size_divisibility``)."""

    def __init__(self, module: nn.Module, outputs: List[list]):
        super().__init__()
        object.__setattr__(self, "original", module)  # not a submodule: no parameters here
        self.outputs = outputs
        self.batch, self.calls = 0, 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.original, name)

    def forward(self, *args, **kwargs):
        out = self.outputs[self.batch][self.calls]
        self.calls += 1
        return _clone(out, grad=torch.is_grad_enabled())


@contextmanager
def _replaying(model: nn.Module, replays: Dict[str, List[list]]):
    """``model`` with each module named in ``replays`` swapped for its :class:`_Replay`; yields
    a function that points the replays at batch ``b``."""
    swapped = []
    for name, outputs in replays.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        original = getattr(owner, child)
        swapped.append((owner, child, original, _Replay(original, outputs)))
    for owner, child, _, replay in swapped:
        setattr(owner, child, replay)

    def to_batch(b):
        for *_, replay in swapped:
            replay.batch, replay.calls = b, 0

    try:
        yield to_batch
    finally:
        for owner, child, original, _ in swapped:
            setattr(owner, child, original)


def _call_counts(model: nn.Module, batch) -> Dict[str, int]:
    """How many times each module of ``model`` runs on one batch."""
    counts: Dict[str, int] = {}

    def hook(name):
        def count(module, args, output):
            counts[name] = counts.get(name, 0) + 1

        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad(), cached_quantized_weights(model.modules()):
            detector_forward(model.eval(), batch)
    finally:
        for h in handles:
            h.remove()
    return counts


def _same_output(module, args, output, win: _Window) -> bool:
    """Whether the window's crop computes the whole map's output in the window."""
    with torch.no_grad():
        crop = _crop(module(*_crop_args(args, win)), win.inner)
        ref = _crop(output, win.out).detach()
    return crop.shape == ref.shape and torch.allclose(crop, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-7)


def _fp_pass(fp_model, batches, names: List[str], window: Dict[str, int], seed: int, fisher: bool,
             keep_inputs: bool, check: bool = False, keep: Optional[Dict[str, frozenset]] = None):
    """The FP32 samples of the units ``names`` over all batches (windows of ``window[name]``
    output pixels, placed by ``seed``; ``check``: a unit whose first window differs from its whole-map output is
    set to whole maps in ``window``), with ``fisher`` the squared detection-loss gradients.
    ``keep``: the calls sampled per unit (default all). Returns the caches and the units in the
    order they first ran."""
    caches = {n: _Cache(keep=(keep or {}).get(n)) for n in names}
    order, outs, busy, seen = [], [], [], {n: 0 for n in names}

    def make_hook(n):
        def hook(module, args, output):
            if busy:  # the window check's own call
                return
            c, call = caches[n], seen[n]
            seen[n] += 1
            if call == 0:
                order.append(n)
            if not c.sampled(call):
                return
            win = _choose_window(args[0].shape, output.shape, window[n], f"{seed}/{call}/{tuple(output.shape[-2:])}")
            if check and not c.windows and win is not None:
                busy.append(n)
                try:
                    if not _same_output(module, args, output, win):
                        logger.info(f"{n}: a {window[n]}-pixel window does not reproduce its output; whole maps.")
                        window[n], win = 0, None
                finally:
                    busy.pop()
            c.calls.append(call)
            c.windows.append(win)
            c.fp_out.append(_crop(output, win and win.out).detach().clone())
            if keep_inputs:
                c.fp_in.append(_crop_args(args, win))
            if fisher:
                outs.append((c, output, win))

        return hook

    handles = [fp_model.get_submodule(n).register_forward_hook(make_hook(n)) for n in names]
    fp_model.train(fisher)
    _eval_norms(fp_model)
    try:
        for batch in batches:
            outs.clear()
            with torch.set_grad_enabled(fisher), EventStorage():  # the losses log statistics
                _, _, loss = detector_forward(fp_model, batch, losses=fisher, image_grad=fisher)
            if fisher and outs:  # (no call of these units sampled in this batch: nothing to do)
                grads = torch.autograd.grad(sum(loss.values()), [o for _, o, _ in outs], allow_unused=True)
                for (c, o, win), g in zip(outs, grads):
                    g = torch.zeros_like(o) if g is None else g
                    c.grad_sq.append(_crop(g, win and win.out).detach().pow(2))
    finally:
        for h in handles:
            h.remove()
        fp_model.eval()
    return caches, order


def _global_fisher(q_model, batches, caches: Dict[str, _Cache], glob: "_Global", replays):
    """Adds the squared gradient of Reg-PTQ's global loss at each unit's outputs (in the
    quantized model as it is before the units are reconstructed) to their cached Fisher
    weights, in their windows."""
    if not caches:
        return
    outs = []
    handles = [
        q_model.get_submodule(n).register_forward_hook(lambda m, a, o, c=c: outs.append((c, o)))
        for n, c in caches.items()
    ]
    q_model.eval()
    seen = {id(c): 0 for c in caches.values()}
    sample = {id(c): {call: i for i, call in enumerate(c.calls)} for c in caches.values()}
    try:  # the weights do not change during the pass: quantized once
        with _replaying(q_model, replays) as to_batch, cached_quantized_weights(q_model.modules()):
            for b, batch in enumerate(batches):
                to_batch(b)
                outs.clear()
                with torch.enable_grad():
                    preds, _, _ = detector_forward(q_model, batch, image_grad=True)
                    loss = global_loss(glob.fp_preds[b], preds, glob.fp_anchors[b], glob.box2box, glob.cfg)
                    grads = torch.autograd.grad(loss, [o for _, o in outs], allow_unused=True)
                for (c, _), g in zip(outs, grads):
                    i = sample[id(c)].get(seen[id(c)])
                    seen[id(c)] += 1
                    if g is not None and i is not None:
                        win = c.window(i)
                        c.grad_sq[i] = c.grad_sq[i] + _crop(g, win and win.out).detach().pow(2)
    finally:
        for h in handles:
            h.remove()


def _q_pass(q_model, batches, name: str, cache: _Cache, replays, capture: List[str], calls: Dict[str, int]):
    """The unit's inputs in the quantized model, cropped to its windows, into ``cache.q_in``;
    the finished modules in ``replays`` replay. Returns the outputs of the modules ``capture``
    per batch (for those whose every call ran)."""
    captured = {m: [[] for _ in batches] for m in capture}
    seen: Dict[str, int] = {}  # calls in this batch
    calls_before = [0]  # the unit's calls in the batches before

    def count(n):
        seen[n] = seen.get(n, 0) + 1
        if all(seen.get(m, 0) >= calls.get(m, 0) for m in [name] + capture):
            raise _Stop  # the rest of the network is not needed

    def unit_hook(module, args, output):
        if cache.sampled(calls_before[0] + seen.get(name, 0)):
            cache.q_in.append(_crop_args(args, cache.window(len(cache.q_in))))
        count(name)

    def capture_hook(m):
        def hook(module, args, output):
            captured[m][b].append(_clone(output))
            count(m)

        return hook

    q_model.eval()
    with _replaying(q_model, replays) as to_batch, cached_quantized_weights(q_model.modules()):
        handles = [q_model.get_submodule(name).register_forward_hook(unit_hook)]
        handles += [q_model.get_submodule(m).register_forward_hook(capture_hook(m)) for m in capture]
        try:
            for b, batch in enumerate(batches):
                to_batch(b)
                seen.clear()
                try:
                    with torch.no_grad():
                        detector_forward(q_model, batch)
                except _Stop:
                    pass
                calls_before[0] += seen.get(name, 0)
        finally:
            for h in handles:
                h.remove()
    return {m: outs for m, outs in captured.items() if all(len(o) == calls.get(m, -1) for o in outs)}


@dataclass
class _Global:
    cfg: PTQConfig
    box2box: object
    fp_preds: List[tuple]
    fp_anchors: List[list]


def _predictor_role(model, name: str):
    """For a head predictor unit: (head, its index among the head's outputs); else None."""
    head_name, _, pred = name.rpartition(".")
    head = model.get_submodule(head_name) if head_name else model
    spec = _head_spec(head)
    if spec is None or pred not in spec.predictors:
        return None
    return list(spec.predictors).index(pred), pred == "bbox_pred"


def _unit_parameters(unit: nn.Module, cfg: PTQConfig):
    """Swap AdaRound onto the unit's uniform weight quantizers; return (rounding modules,
    activation-step parameters, LLAQ parameters, restore function)."""
    roundings, act_params, llaq_params, swapped = [], [], [], []
    for m in unit.modules():
        if isinstance(m, _LAYERS):
            wq = m.weight_quant
            if isinstance(wq, LLAQQuantizer) and wq.fake_quant_enabled and wq.is_initialized:
                llaq_params += [wq.k_pos, wq.a_pos, wq.k_neg, wq.a_neg]
                ada = AdaRoundLLAQ(wq, m.weight)
            elif _uniform_grid(wq):
                ada = AdaRoundWeight(wq, m.weight)
            else:
                continue
            m._init_weight_quant(ada)
            roundings.append(ada)
            swapped.append((m, wq, ada))
    if cfg.learn_act:
        act_params = [q._param() for q in _activation_quantizers(unit) if q.fake_quant_enabled and q.is_initialized]

    def finish():
        """Hard rounding written into the weights; the model's own quantizers back."""
        with torch.no_grad():
            for m, wq, ada in swapped:
                ada.hard = True
                m.weight.copy_(ada(m.weight))
                m._init_weight_quant(wq)

    return roundings, act_params, llaq_params, finish


def _activation_quantizers(unit: nn.Module):
    """The quantizers of the unit that are not weight quantizers."""
    weight_quants = {id(m.weight_quant) for m in unit.modules() if isinstance(m, _LAYERS)}
    return [q for q in unit.modules() if isinstance(q, Quantizer) and id(q) not in weight_quants]


def _drop_hooks(unit: nn.Module, p: float, generator: torch.Generator):
    """QDrop: each activation quantizer of the unit passes its input unquantized with
    probability ``p`` (elementwise), during reconstruction only."""

    def hook(module, args, output):
        keep = torch.rand(output.shape, generator=generator).to(output.device) < p
        return torch.where(keep, args[0], output)

    return [q.register_forward_hook(hook) for q in _activation_quantizers(unit)]


def _mix(q_args, fp_args, p, generator):
    if p <= 0:
        return q_args
    out = []
    for i, q in enumerate(q_args):
        f = fp_args[i] if i < len(fp_args) else None
        if isinstance(q, Tensor) and isinstance(f, Tensor) and q.shape == f.shape:
            q = torch.where(torch.rand(q.shape, generator=generator).to(q.device) < p, f, q)
        out.append(q)
    return tuple(out)


def _output_error(unit, cache: _Cache, norm) -> float:
    """Mean (Fisher-weighted) squared error of the unit's outputs over the cached samples."""
    total = 0.0
    with torch.no_grad():
        for k, args in enumerate(cache.q_in):
            w = cache.grad_sq[k] * norm if norm is not None else 1.0
            total += float((w * (cache.output(unit, k, args) - cache.fp_out[k]).pow(2)).mean())
    return total / max(1, len(cache.q_in))


def _optimize_unit(unit, cache: _Cache, cfg: PTQConfig, role, glob: Optional[_Global], generator, calls_per_batch):
    norm = None
    if cache.grad_sq:
        total = sum(float(g.sum()) for g in cache.grad_sq)
        count = sum(g.numel() for g in cache.grad_sq)
        norm = count / total if total > 0 else None
    unit.train(False)
    before = _output_error(unit, cache, norm)  # the model's own (nearest) rounding
    roundings, act_params, llaq_params, finish = _unit_parameters(unit, cfg)
    groups = []
    if roundings:
        groups.append({"params": [r.V for r in roundings], "lr": cfg.round_lr})
    if act_params:
        groups.append({"params": act_params, "lr": cfg.lr})
    if llaq_params:
        groups.append({"params": llaq_params, "lr": cfg.llaq_lr})
    n = len(cache.q_in)
    if not groups or cfg.iters == 0 or n == 0:
        finish()
        return before, before
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    warm = int(cfg.warmup * cfg.iters)
    hooks = _drop_hooks(unit, cfg.drop_prob, generator) if cfg.drop_prob > 0 else []

    def error(k, out):
        w = cache.grad_sq[k] * norm if norm is not None else 1.0
        return (w * (out - cache.fp_out[k]).pow(2)).sum(1).mean()  # see the module docstring

    try:
        for it in range(cfg.iters):
            k = int(torch.randint(n, (1,), generator=generator))
            args = _mix(cache.q_in[k], cache.fp_in[k], cfg.drop_prob, generator) if cfg.drop_prob > 0 else cache.q_in[k]
            out = cache.output(unit, k, args)
            loss = error(k, out)
            if role is not None and glob is not None:
                loss = loss + _exact_global(out, cache.calls[k], cache.window(k), role, glob, calls_per_batch)
            if roundings and it >= warm:
                beta = 20 - (20 - 2) * (it - warm) / max(1, cfg.iters - warm)
                loss = loss + cfg.round_weight * sum(r.regularizer(beta) for r in roundings)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for h in hooks:
            h.remove()
        finish()
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(False)
    return before, _output_error(unit, cache, norm)


def _exact_global(out, call, win: Optional[_Window], role, glob: _Global, calls_per_batch):
    """Reg-PTQ's global term on one level (in the sample's window), where the unit is the
    predictor ``role``."""
    index, _ = role
    b, level = divmod(call, calls_per_batch)
    fp = [p[level] for p in glob.fp_preds[b]]
    anchors = glob.fp_anchors[b][level]
    if win is not None:  # anchors are laid out (H, W, anchors per location)
        h, w = fp[0].shape[-2:]
        anchors = anchors.view(h, w, -1, 4)[win.out[0], win.out[1]].reshape(-1, 4)
        fp = [_crop(p, win.out) for p in fp]
    preds_fp = tuple([p] for p in fp)
    preds_q = tuple([out if i == index else p] for i, p in enumerate(fp))
    return global_loss(preds_fp, preds_q, [anchors], glob.box2box, glob.cfg, only=index)


def _groups(names, per_unit_bytes, budget):
    groups, current, size = [], [], 0
    for n in names:
        if current and size + per_unit_bytes[n] > budget:
            groups.append(current)
            current, size = [], 0
        current.append(n)
        size += per_unit_bytes[n]
    return groups + ([current] if current else [])


def _finished_module(name: str, units: List[str], done) -> str:
    """The largest module holding unit ``name`` whose units are all done (the unit itself at
    least; never the whole model)."""
    top = name
    while "." in top:
        parent = top.rpartition(".")[0]
        if not all(u in done for u in units if u.startswith(parent + ".")):
            break
        top = parent
    return top


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


def reconstruct(q_model: DenseDetector, fp_model: DenseDetector, batches: List[list], cfg: PTQConfig):
    """Reconstruct ``q_model`` unit by unit against ``fp_model`` (same names; BN folded alike) on
    the calibration ``batches`` (lists of detectron2 dicts with instances). Returns a list of
    (unit, error before, error after)."""
    cfg = cfg.resolved()
    generator = torch.Generator().manual_seed(cfg.seed)
    names = reconstruction_units(q_model, cfg.block_wise)
    for p in list(q_model.parameters()) + list(fp_model.parameters()):
        p.requires_grad_(False)
    glob = None
    if cfg.global_loss:
        fp_model.eval()
        with torch.no_grad():
            outs = [detector_forward(fp_model, b) for b in batches]
        glob = _Global(cfg, fp_model.box2box_transform, [o[0] for o in outs], [[a.tensor for a in o[1]] for o in outs])
    # on the first batch: the order the units run in, their calls, windows and bytes per call
    window = {n: cfg.window for n in names}
    probe, names = _fp_pass(fp_model, batches[:1], names, window, cfg.seed, fisher=False, keep_inputs=True, check=True)
    calls = _call_counts(q_model, batches[0])
    keep, per_unit = {}, {}
    for n, c in probe.items():
        total = calls[n] * len(batches)
        if 0 < cfg.samples < total:  # a random subset of the unit's calls
            keep[n] = frozenset(random.Random(f"{cfg.seed}/{n}").sample(range(total), cfg.samples))
        # FP32 outputs (+ Fisher weights) and inputs (quantized + FP32 for QDrop)
        per_call = _bytes(c.fp_out) * (2 if cfg.fisher else 1) + _bytes(sum(c.fp_in, ())) * (2 if cfg.drop_prob > 0 else 1)
        per_unit[n] = per_call / len(c.fp_out) * min(total, cfg.samples or total)
    del probe
    replays: Dict[str, List[list]] = {}  # finished modules -> their outputs per batch, call by call
    finished: List[str] = []  # to capture in the next pass
    report, done, start = [], set(), time.perf_counter()
    for group in _groups(names, per_unit, cfg.cache_mb * 2**20):
        caches, _ = _fp_pass(
            fp_model, batches, group, window, cfg.seed, fisher=cfg.fisher, keep_inputs=cfg.drop_prob > 0, keep=keep
        )
        if glob is not None and cfg.fisher:
            others = {n: c for n, c in caches.items() if _predictor_role(q_model, n) is None}
            _global_fisher(q_model, batches, others, glob, replays)
            del others
        for name in group:
            cache = caches.pop(name)
            for module, outputs in _q_pass(q_model, batches, name, cache, replays, finished, calls).items():
                for inner in [m for m in replays if m.startswith(module + ".")]:
                    del replays[inner]
                replays[module] = outputs
            unit = q_model.get_submodule(name)
            role = _predictor_role(q_model, name)
            before, after = _optimize_unit(unit, cache, cfg, role, glob, generator, calls[name])
            del cache
            done.add(name)
            finished = [_finished_module(name, names, done)]
            elapsed = time.perf_counter() - start
            eta = elapsed / len(done) * (len(names) - len(done))
            logger.info(f"[{len(done)}/{len(names)}] {name}: output error {before:.4g} -> {after:.4g}  (eta {eta:.0f}s)")
            report.append((name, before, after))
    for p in q_model.parameters():
        p.requires_grad_(True)
    return report
