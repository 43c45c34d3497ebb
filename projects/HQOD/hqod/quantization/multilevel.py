"""
Multi-level BN (AQD Sec. 3.2.2, Fig. 3b) for heads shared over FPN levels, indexed by level.

The shared head's tower convs get one full BN (statistics AND affine) per FPN level. The level
is passed explicitly: the quantized head's ``forward`` loops over the levels and calls
``forward_level(feature, level)``; the towers are :class:`LevelSequential` and hand ``level``
to every :class:`MultiLevelBatchNorm`, whose ``forward(x, level)`` refuses to run without it.
Unlike detectron2's ``CycleBatchNormList`` (and AQD's official code), nothing depends on the
order or the number of calls. :class:`MultiLevelHead` is the quantized form of every head that
declares its towers and predictors (:mod:`hqod.modeling.dense_head`).

Checkpoints: an FP32 head with one shared BN, or detectron2's ``CycleBatchNormList`` (per-level
statistics + shared affine), loads into every level — the keys are expanded when the state dict
is loaded (:meth:`MultiLevelBatchNorm.expand_state_dict`), so ``load_state_dict`` and
detectron2's checkpointer both work.
"""
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from torch import nn

from detectron2.layers import CycleBatchNormList, NaiveSyncBatchNorm
from detectron2.utils import comm

from hqod.modeling.dense_head import DenseHeadSpec, dense_head_spec

from .integer_layers import integer_batch_norm
from .modules import QConv2d, QuantizedModule, cached_quantized_weights

__all__ = [
    "MultiLevelBatchNorm",
    "LevelSequential",
    "MultiLevelHead",
    "shared_bn_keys",
]

_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn_class():
    """BN when training in one process; synchronized BN (AQD's setting) otherwise — PyTorch's
    SyncBatchNorm with CUDA, detectron2's NaiveSyncBatchNorm on CPU (PyTorch's needs CUDA)."""
    if comm.get_world_size() > 1:
        return nn.SyncBatchNorm if torch.cuda.is_available() else NaiveSyncBatchNorm
    return nn.BatchNorm2d


class MultiLevelBatchNorm(nn.Module, QuantizedModule):
    """
    One BatchNorm2d per FPN level (children ``"0" .. str(num_levels - 1)``, the names of
    ``CycleBatchNormList``), selected by the ``level`` argument of :meth:`forward`.
    ``output_quant`` (scope ``aqd``) fake-quantizes the output, shared over levels.

    Scope ``aqd``: :meth:`from_accumulator` is AQD's integer BN on the output of the
    integer-aware conv before it (Eq. 5-6: shift rounded in units of ``alpha_conv``,
    straight-through, per channel and level), as :class:`~.modules.QBatchNorm2d`;
    :class:`LevelSequential` calls it.
    """

    convert_children = False

    def __init__(self, num_levels: int, num_features: int, *, eps=1e-5, momentum=0.1, bn_class=None, output_quant=None):
        super().__init__()
        bn_class = bn_class or _bn_class()
        for level in range(num_levels):
            self.add_module(str(level), bn_class(num_features, eps=eps, momentum=momentum))
        self.num_levels = num_levels
        self.output_quant = output_quant

    @property
    def levels(self) -> List[nn.Module]:
        """The per-level BNs, in level order."""
        return [self._modules[str(level)] for level in range(self.num_levels)]

    @classmethod
    def from_norm(cls, norm: nn.Module, num_levels: int, output_quant=None) -> "MultiLevelBatchNorm":
        """Per-level BN initialized from a shared BN (every level gets its state) or from a
        ``CycleBatchNormList`` (level l gets BN l's statistics and the shared affine), with the
        output quantizer ``output_quant`` (scope ``aqd``) or none."""
        if isinstance(norm, CycleBatchNormList):
            bns = list(norm)
            if len(bns) != num_levels:
                raise ValueError(
                    f"CycleBatchNormList has {len(bns)} BNs but the head has {num_levels} levels."
                )
            weight = getattr(norm, "weight", None)
            bias = getattr(norm, "bias", None)
        elif isinstance(norm, nn.modules.batchnorm._BatchNorm):
            bns = [norm] * num_levels
            weight, bias = norm.weight, norm.bias
        else:
            raise TypeError(f"Cannot build a multi-level BN from {type(norm).__qualname__}.")
        ref = bns[0]
        new = cls(num_levels, ref.num_features, eps=ref.eps, momentum=ref.momentum, output_quant=output_quant)
        with torch.no_grad():
            for bn, src in zip(new.levels, bns):
                if src.track_running_stats and src.running_mean is not None:
                    bn.running_mean.copy_(src.running_mean)
                    bn.running_var.copy_(src.running_var)
                    bn.num_batches_tracked.copy_(src.num_batches_tracked)
                if weight is not None:
                    bn.weight.copy_(weight)
                    bn.bias.copy_(bias)
        return new.to(ref.running_mean.device if ref.running_mean is not None else "cpu")

    def _level(self, level: Optional[int]) -> nn.Module:
        if level is None:
            raise ValueError(
                "MultiLevelBatchNorm needs the FPN level: call forward(x, level) (the quantized "
                "head's forward_level does)."
            )
        return self._modules[str(level)]

    def _quantize_output(self, x):
        return x if self.output_quant is None else self.output_quant(x)

    def forward(self, x, level: Optional[int] = None):
        return self._quantize_output(self._level(level)(x))

    def from_accumulator(self, x, acc_step, level: int):
        """Eq. 6 with this level's BN on ``x = eta_conv * alpha_conv`` (``acc_step =
        alpha_conv``), then the output quantizer."""
        bn = self._level(level)
        return self._quantize_output(integer_batch_norm(bn, x, acc_step, bn.forward))

    @staticmethod
    def expand_state_dict(state_dict: Dict[str, torch.Tensor], prefix: str, num_levels: int):
        """
        In place: turn a shared BN's keys ``prefix + weight/bias/running_*`` (plain BN, or the
        shared affine of a CycleBatchNormList) into per-level keys ``prefix + f"{l}.weight"``...
        Keys already per level are kept. Returns the list of expanded source keys.
        """
        expanded = []
        for key in _BN_STATE:
            src = prefix + key
            if src not in state_dict:
                continue
            value = state_dict.pop(src)
            expanded.append(src)
            for level in range(num_levels):
                state_dict.setdefault(f"{prefix}{level}.{key}", value.clone())
        return expanded

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.expand_state_dict(state_dict, prefix, self.num_levels)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        return f"num_levels={self.num_levels} (indexed by level)"


def shared_bn_keys(model: nn.Module, state_dict) -> List[str]:
    """The keys of ``state_dict`` that load into every level of a multi-level BN of ``model``
    (a shared BN's, or a CycleBatchNormList's shared affine)."""
    prefixes = [f"{n}." for n, m in model.named_modules() if isinstance(m, MultiLevelBatchNorm)]
    return [p + key for p in prefixes for key in _BN_STATE if p + key in state_dict]


def _integer_bn_pair(layer: nn.Module, nxt: Optional[nn.Module]) -> bool:
    """A bare integer-aware quantized conv (scope ``aqd``, ``quant.integer_bias``) followed by a
    multi-level BN: the BN computes Eq. 6 from the conv's accumulator."""
    return (
        isinstance(layer, QConv2d) and layer.integer_aware and layer.norm is None and layer.activation is None
        and isinstance(nxt, MultiLevelBatchNorm)
    )


class LevelSequential(nn.Sequential):
    """A head tower: ``forward(x, level)`` passes ``level`` to its multi-level BNs; a quantized
    conv followed by one hands it its accumulator and step (integer BN: scope ``aqd``,
    ``quant.integer_bias``)."""

    def forward(self, x, level: int):
        layers = list(self)
        acc_step = None
        for layer, nxt in zip(layers, layers[1:] + [None]):
            if isinstance(layer, MultiLevelBatchNorm):
                x = layer(x, level) if acc_step is None else layer.from_accumulator(x, acc_step, level)
                acc_step = None
            elif _integer_bn_pair(layer, nxt):
                x, acc_step = layer.accumulate(x)  # not rounded: the BN takes the accumulator
            else:
                x = layer(x)
        return x


class MultiLevelHead(nn.Module, QuantizedModule):
    """
    The quantized form of any declared dense head (:mod:`hqod.modeling.dense_head`), built by
    :meth:`from_float` from the float head and its declaration: the same children under the same
    names (state-dict keys unchanged), each declared tower a :class:`LevelSequential` with one BN
    per level (``quant.multi_level_bn``). ``forward(features)`` returns, like the float head, one
    list per predictor of ``predictor(tower(feature, level))`` over the levels; weights are
    quantized once per forward pass, not once per level.
    """

    def __init__(self, spec: DenseHeadSpec, num_levels: int, children: Dict[str, nn.Module], float_type: type):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)
        self.spec = spec
        self.num_levels = num_levels
        self.float_type = float_type

    @classmethod
    def from_float(cls, module, *, name, ctx):
        spec = dense_head_spec(type(module))  # checked against the head by quantize_model
        num_levels = ctx.head_levels.get(name)
        if num_levels is None:
            raise ValueError(
                f"{type(module).__qualname__} at {name or 'the root'} is not the head of a "
                "detectron2 DenseDetector, which gives its number of levels "
                "(len(head_in_features)): quantize the detector."
            )
        children = dict(module.named_children())
        for tower_name in spec.towers:
            layers = []
            for idx, layer in children[tower_name].named_children():
                if ctx.multi_level_bn and isinstance(layer, (CycleBatchNormList, nn.modules.batchnorm._BatchNorm)):
                    bits = ctx.aqd_output_bits(f"{name}.{tower_name}.{idx}")
                    output_quant = None if bits is None else ctx.quantizer(bits, signed=True, output=True)
                    layer = MultiLevelBatchNorm.from_norm(layer, num_levels, output_quant)
                layers.append((idx, layer))
            children[tower_name] = LevelSequential(OrderedDict(layers))
        return cls(spec, num_levels, children, type(module))

    def forward(self, features: List[torch.Tensor]):
        if len(features) != self.num_levels:
            raise ValueError(f"The head was quantized for {self.num_levels} levels; got {len(features)} feature maps.")
        with cached_quantized_weights(self.modules()):
            outputs = [self.forward_level(f, level) for level, f in enumerate(features)]
        return tuple(list(o) for o in zip(*outputs))

    def forward_level(self, feature: torch.Tensor, level: int):
        """This level's outputs, one per predictor in the declared order."""
        towers = {name: self._modules[name](feature, level) for name in self.spec.towers}
        return tuple(self.predict(pred, towers[tower], level) for pred, tower in self.spec.predictors.items())

    def predict(self, name: str, x: torch.Tensor, level: int) -> torch.Tensor:
        """The predictor ``name`` on a tower's output (the same for every level here)."""
        return self._modules[name](x)

    def extra_repr(self):
        return f"quantized {self.float_type.__qualname__}, {self.num_levels} levels, predictors={self.spec.predictors}"
