"""
Block / layer reconstruction (AdaRound, BRECQ, QDrop, Reg-PTQ) on a quantized dense detector.

Units, in the model's order: with block granularity the backbone's stem and residual blocks,
then every quantized conv / linear layer outside them (neck and head: layer-wise); with layer
granularity every quantized layer. For each unit:

1. cached: its FP32 inputs and outputs (the FP32 model, BN folded, on the calibration images),
   the squared gradient of the detection loss at those outputs (``fisher``, BRECQ's diagonal
   Fisher; the calibration images are training images, so their boxes give the loss), and the
   unit's inputs in the quantized model as the units before it left it;
2. optimized for ``iters`` steps, one cached batch (one call of the unit) per step: AdaRound's
   rounding variables of its weights (the weight steps fixed), the steps of its activation
   quantizers and LLAQ's parameters, with Adam, on

       sum_features(F * (O_hat - O)^2), averaged over the batch
       + round_weight * sum_weights(1 - |2h(V) - 1|^beta)  [+ the global term]

   (AdaRound's and BRECQ's normalization: the relative weight of the regularizer matters),

   ``F`` the Fisher weight normalized to mean 1 over the unit (1 without ``fisher``), beta
   annealed from 20 to 2 after the warm-up; QDrop: each activation quantizer of the unit and
   the unit's input keep their FP32 value with probability ``drop_prob``;
3. the rounding made hard and written into the weight (on its grid, so that the model's own
   quantizer reproduces it exactly).

Reg-PTQ's global term (``hqod.ptq.global_loss``) is computed exactly where the unit is a head
predictor (its output is the head output); for the other units it enters through the Fisher
weight: ``F = g_det^2 + g_glob^2`` with ``g_glob`` the gradient of the global loss at the
unit's output in the quantized model, cached before the unit is optimized (its diagonal
Gauss-Newton form). Exact everywhere would cost a forward and backward pass of the rest of the
detector per step.
"""
import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.utils.events import EventStorage

from detectron2.layers import FrozenBatchNorm2d

from hqod.quantization import LQQuantizer, MultiLevelBatchNorm, QConv2d, QLinear, Quantizer
from hqod.quantization.quantize import _head_spec

from .config import PTQConfig
from .global_loss import global_loss
from .llaq import LLAQQuantizer

__all__ = ["AdaRoundWeight", "reconstruction_units", "reconstruct", "detector_forward"]

logger = logging.getLogger(__name__)

BLOCK_TYPES = (BasicStem, BasicBlock, BottleneckBlock)
_LAYERS = (QConv2d, QLinear)


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


@dataclass
class _Cache:
    fp_in: List[tuple] = field(default_factory=list)
    fp_out: List[Tensor] = field(default_factory=list)
    grad_sq: List[Tensor] = field(default_factory=list)
    q_in: List[tuple] = field(default_factory=list)
    first_call: int = -1


def _detach_args(args):
    return tuple(a.detach().clone() if isinstance(a, Tensor) else a for a in args)


def _eval_norms(model):
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, MultiLevelBatchNorm, FrozenBatchNorm2d)):
            m.eval()


def _fp_pass(fp_model, batches, names: List[str], fisher: bool) -> Dict[str, _Cache]:
    """FP32 inputs, outputs and (``fisher``) squared detection-loss gradients of the units
    ``names``, over all batches."""
    caches = {n: _Cache() for n in names}
    handles, outs = [], []
    for n in names:
        def hook(module, args, output, n=n):
            if caches[n].first_call < 0:
                caches[n].first_call = sum(len(c.fp_out) for c in caches.values())
            caches[n].fp_in.append(_detach_args(args))
            caches[n].fp_out.append(output.detach().clone())
            if fisher:
                outs.append((n, output))
        handles.append(fp_model.get_submodule(n).register_forward_hook(hook))
    fp_model.train(fisher)
    _eval_norms(fp_model)
    try:
        for batch in batches:
            outs.clear()
            with torch.set_grad_enabled(fisher), EventStorage():  # the losses log statistics
                _, _, loss = detector_forward(fp_model, batch, losses=fisher, image_grad=fisher)
            if fisher:
                total = sum(loss.values())
                grads = torch.autograd.grad(total, [o for _, o in outs], allow_unused=True)
                for (n, o), g in zip(outs, grads):
                    caches[n].grad_sq.append(torch.zeros_like(o.detach()) if g is None else g.detach().pow(2))
    finally:
        for h in handles:
            h.remove()
        fp_model.eval()
    return caches


def _q_pass(q_model, batches, name: str, cache: _Cache, glob: Optional["_Global"]):
    """The unit's inputs in the quantized model; with ``glob``, also adds the squared gradient
    of the global loss at its outputs to the cached Fisher weights."""
    unit = q_model.get_submodule(name)
    calls_per_batch = []
    outs = []

    def hook(module, args, output):
        cache.q_in.append(_detach_args(args))
        if glob is not None:
            outs.append(output)
        elif calls_per_batch and len(cache.q_in) % calls_per_batch[0] == 0:
            raise _Stop  # the rest of the network is not needed

    handle = unit.register_forward_hook(hook)
    q_model.eval()
    try:
        for b, batch in enumerate(batches):
            outs.clear()
            before = len(cache.q_in)
            try:
                with torch.set_grad_enabled(glob is not None):
                    preds, _, _ = detector_forward(q_model, batch, image_grad=glob is not None)
                if glob is not None:
                    loss = global_loss(glob.fp_preds[b], preds, glob.fp_anchors[b], glob.box2box, glob.cfg)
                    grads = torch.autograd.grad(loss, outs, allow_unused=True)
                    for i, g in enumerate(grads):
                        if g is not None:
                            k = before + i
                            cache.grad_sq[k] = cache.grad_sq[k] + g.detach().pow(2)
            except _Stop:
                pass
            if not calls_per_batch:
                calls_per_batch.append(len(cache.q_in) - before)
    finally:
        handle.remove()


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
            if isinstance(wq, LLAQQuantizer):
                llaq_params += [wq.k_pos, wq.a_pos, wq.k_neg, wq.a_neg]
            elif _uniform_grid(wq):
                ada = AdaRoundWeight(wq, m.weight)
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
    """Mean (Fisher-weighted) squared error of the unit's outputs over the cached calls."""
    total = 0.0
    with torch.no_grad():
        for k, args in enumerate(cache.q_in):
            w = cache.grad_sq[k] * norm if norm is not None else 1.0
            total += float((w * (unit(*args) - cache.fp_out[k]).pow(2)).mean())
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
        groups.append({"params": llaq_params, "lr": cfg.round_lr})
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
        return (w * (out - cache.fp_out[k]).pow(2)).flatten(1).sum(1).mean()

    try:
        for it in range(cfg.iters):
            k = int(torch.randint(n, (1,), generator=generator))
            out = unit(*_mix(cache.q_in[k], cache.fp_in[k], cfg.drop_prob, generator))
            loss = error(k, out)
            if role is not None and glob is not None:
                loss = loss + _exact_global(out, k, role, glob, calls_per_batch)
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


def _exact_global(out, k, role, glob: _Global, calls_per_batch):
    """Reg-PTQ's global term on one level, where the unit is the predictor ``role``."""
    index, is_box = role
    b, level = divmod(k, calls_per_batch)
    fp = glob.fp_preds[b]
    anchors = glob.fp_anchors[b][level]
    preds_fp = tuple([p[level]] for p in fp)
    preds_q = tuple([out if i == index else p[level]] for i, p in enumerate(fp))
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
    # bytes per unit over all batches, measured on the first batch
    probe = _fp_pass(fp_model, batches[:1], names, fisher=False)
    first_call = {n: c.first_call for n, c in probe.items()}
    names = sorted(names, key=first_call.get)  # the order the network runs them
    factor = (3 if cfg.fisher else 2) * len(batches)
    per_unit = {n: factor * sum(t.numel() * 4 for t in c.fp_out) for n, c in probe.items()}
    calls = {n: len(c.fp_out) for n, c in probe.items()}
    del probe
    report, done, start = [], 0, time.perf_counter()
    for group in _groups(names, per_unit, cfg.cache_mb * 2**20):
        caches = _fp_pass(fp_model, batches, group, fisher=cfg.fisher)
        for name in group:
            cache = caches.pop(name)
            role = _predictor_role(q_model, name)
            _q_pass(q_model, batches, name, cache, glob if (glob is not None and role is None and cfg.fisher) else None)
            unit = q_model.get_submodule(name)
            for p in unit.parameters():
                p.requires_grad_(False)
            before, after = _optimize_unit(unit, cache, cfg, role, glob, generator, calls[name])
            del cache
            done += 1
            elapsed = time.perf_counter() - start
            eta = elapsed / done * (len(names) - done)
            if before is not None:
                logger.info(f"[{done}/{len(names)}] {name}: output error {before:.4g} -> {after:.4g}  (eta {eta:.0f}s)")
            report.append((name, before, after))
    for p in q_model.parameters():
        p.requires_grad_(True)
    return report
