"""
Quantized layers, registered in ``QUANT_MODULES``.

A registered class is a subclass of the float layer it replaces plus :class:`QuantizedModule`;
it names the float types it converts (``float_types``, exact types) and converts one module in
place with ``from_float(module, name=..., ctx=...)``: the module is re-classed and gets quantizer
children, its parameters, buffers and children stay the same objects. FP32 state-dict keys are
therefore unchanged; the quantizers add keys of their own (``*.weight_quant.*``,
``*.input_quant.*``, ``*.output_quant.*``, ``*.add_quant.*``, ``*.fuse_quants.*``).
``from_float`` returns None to leave the module as it is (another scope, or a layer kept FP32).

Supporting a new layer type = registering one class. Where quantizers sit:

* conv / linear (both scopes): weights (signed) and the input activation (signed unless the
  producer is a ReLU) — the "W" and "A" of WxAy;
* BN (scope ``aqd``): its output (signed), AQD Sec. 3.2.2;
* residual add of ResNet blocks and FPN top-down add (scope ``aqd``): the sum (signed), before
  the following ReLU, AQD Sec. 3.2.3.

The integer-only arithmetic of AQD (Eq. 5-8: rounded BN shift, c/2^d add rescaling) is not
simulated here; these layers fake-quantize tensors only.
"""
import contextlib
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from fvcore.common.registry import Registry
from torch import nn

from detectron2.layers import Conv2d, NaiveSyncBatchNorm
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock

__all__ = [
    "QUANT_MODULES",
    "QuantizedModule",
    "QConv2d",
    "QLinear",
    "QBatchNorm2d",
    "QSyncBatchNorm",
    "QNaiveSyncBatchNorm",
    "QBasicBlock",
    "QBottleneckBlock",
    "QFPN",
    "cached_quantized_weights",
    "find_quant_module_class",
]

QUANT_MODULES = Registry("QUANT_MODULES")
QUANT_MODULES.__doc__ = """
Registry of quantized layers. Each entry is a :class:`QuantizedModule` subclass with
``float_types`` (the exact float classes it converts) and ``from_float(module, *, name, ctx)``.
"""


def find_quant_module_class(float_type: type):
    """The registered class converting ``float_type`` (exact type match), or None."""
    found = [cls for _, cls in QUANT_MODULES if float_type in cls.float_types]
    if len(found) > 1:
        raise RuntimeError(
            f"{float_type.__qualname__} is converted by several QUANT_MODULES entries: "
            f"{[c.__name__ for c in found]}"
        )
    return found[0] if found else None


class QuantizedModule:
    """
    Mixin of every registered quantized layer.

    Class attributes:
        float_types: the float classes this class converts (exact types, no subclasses).
        convert_children: whether ``quantize_model`` goes on converting the children of a
            converted module (e.g. the ``norm`` of a detectron2 Conv2d).
    """

    float_types = ()
    convert_children = True

    @classmethod
    def from_float(cls, module: nn.Module, *, name: str, ctx) -> Optional[nn.Module]:
        raise NotImplementedError

    @classmethod
    def _reclass(cls, module: nn.Module) -> nn.Module:
        module.__class__ = cls
        return module


class _WeightQuantMixin:
    """Quantized weight, computed once per forward pass of a head that shares it over levels
    (see :func:`cached_quantized_weights`)."""

    def _init_weight_quant(self, weight_quant):
        self.weight_quant = weight_quant
        self._set_weight_cache(False)

    def _set_weight_cache(self, enabled: bool, value=None):
        # plain attributes: with fake-quant off the "quantized" weight is the Parameter itself,
        # which nn.Module.__setattr__ would otherwise register
        object.__setattr__(self, "_weight_cache_enabled", enabled)
        object.__setattr__(self, "_cached_weight", value)

    def quantized_weight(self) -> torch.Tensor:
        if not self._weight_cache_enabled:
            return self.weight_quant(self.weight)
        if self._cached_weight is None:
            self._set_weight_cache(True, self.weight_quant(self.weight))
        return self._cached_weight


@contextlib.contextmanager
def cached_quantized_weights(modules: Iterable[nn.Module]):
    """
    Within this context each given quantized conv/linear quantizes its weight once and reuses
    it (same autograd node) on later calls: a head shared over 5 FPN levels fake-quantizes its
    weights 5x less. The cache is dropped on exit, so a new forward pass quantizes again.
    """
    modules = [m for m in modules if isinstance(m, _WeightQuantMixin)]
    for m in modules:
        m._set_weight_cache(True)
    try:
        yield
    finally:
        for m in modules:
            m._set_weight_cache(False)


@QUANT_MODULES.register()
class QConv2d(_WeightQuantMixin, Conv2d, QuantizedModule):
    """
    Conv with fake-quantized weight and input: ``norm(conv(Q_a(x), Q_w(W)))`` then activation.
    Converts ``torch.nn.Conv2d`` and detectron2's ``Conv2d`` (keeping its ``norm`` and
    ``activation``).
    """

    float_types = (nn.Conv2d, Conv2d)

    @classmethod
    def from_float(cls, module, *, name, ctx):
        bits = ctx.layer_bits(name)
        if bits is None:
            return None
        weight_bits, act_bits = bits
        had_norm = isinstance(module, Conv2d)
        cls._reclass(module)
        if not had_norm:
            module.norm, module.activation = None, None
        module._init_weight_quant(ctx.quantizer(weight_bits, signed=True))
        module.input_quant = ctx.quantizer(act_bits, signed=ctx.input_signed(name))
        return module

    def forward(self, x):
        x = self._conv_forward(self.input_quant(x), self.quantized_weight(), self.bias)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


@QUANT_MODULES.register()
class QLinear(_WeightQuantMixin, nn.Linear, QuantizedModule):
    """Linear layer with fake-quantized weight and input."""

    float_types = (nn.Linear,)

    @classmethod
    def from_float(cls, module, *, name, ctx):
        bits = ctx.layer_bits(name)
        if bits is None:
            return None
        cls._reclass(module)
        module._init_weight_quant(ctx.quantizer(bits[0], signed=True))
        module.input_quant = ctx.quantizer(bits[1], signed=ctx.input_signed(name))
        return module

    def forward(self, x):
        return F.linear(self.input_quant(x), self.quantized_weight(), self.bias)


class _OutputQuantBN(QuantizedModule):
    """BN whose (signed) output is fake-quantized — scope ``aqd`` only."""

    @classmethod
    def from_float(cls, module, *, name, ctx):
        if ctx.scope != "aqd":
            return None
        bits = ctx.output_bits(name)
        if bits is None:
            return None
        cls._reclass(module)
        module.output_quant = ctx.quantizer(bits, signed=True, output=True)
        return module

    def forward(self, x):
        return self.output_quant(super().forward(x))


@QUANT_MODULES.register()
class QBatchNorm2d(_OutputQuantBN, nn.BatchNorm2d):
    float_types = (nn.BatchNorm2d,)


@QUANT_MODULES.register()
class QSyncBatchNorm(_OutputQuantBN, nn.SyncBatchNorm):
    float_types = (nn.SyncBatchNorm,)


@QUANT_MODULES.register()
class QNaiveSyncBatchNorm(_OutputQuantBN, NaiveSyncBatchNorm):
    float_types = (NaiveSyncBatchNorm,)


class _QuantAddBlock(QuantizedModule):
    """ResNet block whose residual sum is fake-quantized before the last ReLU (scope ``aqd``).
    Its convs (and their BN) are converted as children."""

    @classmethod
    def from_float(cls, module, *, name, ctx):
        if ctx.scope != "aqd":
            return None
        bits = ctx.output_bits(name)
        if bits is None:
            return None
        cls._reclass(module)
        module.add_quant = ctx.quantizer(bits, signed=True, output=True)
        return module

    def _residual(self, x, out):
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(self.add_quant(out + shortcut))


@QUANT_MODULES.register()
class QBasicBlock(_QuantAddBlock, BasicBlock):
    float_types = (BasicBlock,)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        return self._residual(x, self.conv2(out))


@QUANT_MODULES.register()
class QBottleneckBlock(_QuantAddBlock, BottleneckBlock):
    float_types = (BottleneckBlock,)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        return self._residual(x, self.conv3(out))


@QUANT_MODULES.register()
class QFPN(FPN, QuantizedModule):
    """detectron2's FPN whose top-down sums (lateral + upsampled) are fake-quantized (scope
    ``aqd``). Same computation as ``FPN.forward`` of detectron2 v0.6 (unchanged in later
    versions)."""

    float_types = (FPN,)

    @classmethod
    def from_float(cls, module, *, name, ctx):
        if ctx.scope != "aqd":
            return None
        bits = ctx.output_bits(name)
        if bits is None:
            return None
        cls._reclass(module)
        module.fuse_quants = nn.ModuleList(
            ctx.quantizer(bits, signed=True, output=True)
            for _ in range(len(module.lateral_convs) - 1)
        )
        return module

    def forward(self, x):
        bottom_up_features = self.bottom_up(x)
        results = []
        prev_features = self.lateral_convs[0](bottom_up_features[self.in_features[-1]])
        results.append(self.output_convs[0](prev_features))
        for idx, (lateral_conv, output_conv) in enumerate(
            zip(self.lateral_convs, self.output_convs)
        ):
            if idx > 0:
                features = bottom_up_features[self.in_features[-idx - 1]]
                top_down_features = F.interpolate(prev_features, scale_factor=2.0, mode="nearest")
                prev_features = lateral_conv(features) + top_down_features
                if self._fuse_type == "avg":
                    prev_features = prev_features / 2
                prev_features = self.fuse_quants[idx - 1](prev_features)
                results.insert(0, output_conv(prev_features))
        if self.top_block is not None:
            if self.top_block.in_feature in bottom_up_features:
                top_block_in_feature = bottom_up_features[self.top_block.in_feature]
            else:
                top_block_in_feature = results[self._out_features.index(self.top_block.in_feature)]
            results.extend(self.top_block(top_block_in_feature))
        assert len(self._out_features) == len(results)
        return {f: res for f, res in zip(self._out_features, results)}
