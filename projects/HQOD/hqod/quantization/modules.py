"""
Quantized layers, registered in ``QUANT_MODULES``.

A registered class is a subclass of the float layer it replaces plus :class:`QuantizedModule`;
it names the float types it converts (``float_types``, exact types), and
``from_float(module, name=..., ctx=...)`` constructs the quantized layer from the float one and
its new quantizers (``__init__(float_module, *, <quantizers>)``): the new layer holds the float
layer's parameters, buffers and children, the same objects under the same names
(:func:`hqod.utils.adopt_state`), so FP32 state-dict keys are unchanged; the quantizers add
keys of their own (``*.weight_quant.*``, ``*.input_quant.*``, ``*.output_quant.*``,
``*.add_quant.*``, ``*.fuse_quants.*``).
``from_float`` returns None to leave the module as it is (another scope, or a layer kept FP32).

Supporting a new layer type = registering one class. Where quantizers sit:

* conv / linear (both scopes): weights (signed) and the input activation (signed unless the
  producer is a ReLU) — the "W" and "A" of WxAy;
* BN (scope ``aqd``): its output (signed), AQD Sec. 3.2.2;
* residual add of ResNet blocks and FPN top-down add (scope ``aqd``): the sum (signed), before
  the following ReLU, AQD Sec. 3.2.3; likewise MobileNetV2's residual add (no ReLU after it).

Scope ``aqd`` needs ReLU-family activations (none, ReLU, ReLU6) after the BN outputs; a conv
with another one (YOLOX's SiLU) is an error naming it.

BN and add quantizers use ``quant.output_bits`` (default 8), conv inputs ``act_bits``.

Scope ``aqd`` is also integer-aware (AQD Eq. 4-8, :mod:`.integer_layers`): the fake-quant model
computes what the integer-only engine (:mod:`hqod.quantization.integer`) computes.

* A quantized conv computes ``eta_conv * alpha_conv`` with ``alpha_conv = alpha_x * alpha_w``
  (Eq. 4): :meth:`QConv2d.accumulate` returns the accumulator and its step; the bias is
  rounded to an integer in units of ``alpha_conv`` and, without a BN, the output to the exact
  accumulator (straight-through).
* The BN that follows it (its ``norm``; in the heads the next layer of the tower,
  :class:`~.multilevel.LevelSequential`) is given both (``from_accumulator(x, alpha_conv)``):
  it rounds its shift ``s``, in units of ``alpha_conv``, to an integer (Eq. 5-6,
  straight-through, per channel) and computes ``(eta_conv + round(s)) * alpha_z`` exactly,
  ``alpha_z = alpha_conv * gamma / sigma``, then its output quantizer.
* A residual or FPN add aligns the scales of its two inputs with ``F(m, n) = c / 2^d``
  (Eq. 7-8): the integers of the input with the larger scale are multiplied by ``c / 2^d``.
  The scales are those of the quantizers whose grids the inputs lie on: the BN output
  quantizers of the branches, and for an identity shortcut the quantizer of the block's input
  (the previous block's add, or the stem's BN), which :class:`QResNet` hands to each block
  (:meth:`QResNet.block_inputs`).

With fake quantization off (calibration, FP32 checks) all of this is off: the float layers.
"""
import contextlib
import functools
import itertools
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from fvcore.common.registry import Registry
from torch import nn

from detectron2.layers import Conv2d, NaiveSyncBatchNorm
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock

from hqod.modeling.mobilenet import InvertedResidual, MobileNetV2
from hqod.utils import adopt_state

from .integer_layers import (
    AddAlignment,
    align_add,
    aligned_add,
    integer_batch_norm,
    integer_bias,
    round_to_grid,
)

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
    "QResNet",
    "QInvertedResidual",
    "QMobileNetV2",
    "add_alignment",
    "set_bfloat16_codes",
    "set_integer_aware",
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


class _AQDOutputModule(QuantizedModule):
    """A layer converted under scope ``aqd`` only, whose outputs get quantizers of
    ``output_bits``: ``cls(module, **output_quantizers(module, new_quantizer))``; left as it is
    otherwise."""

    @classmethod
    def from_float(cls, module, *, name, ctx):
        bits = ctx.aqd_output_bits(name)
        if bits is None:
            return None
        return cls(module, **cls.output_quantizers(module, lambda: ctx.quantizer(bits, signed=True, output=True)))

    @classmethod
    def output_quantizers(cls, module: nn.Module, new_quantizer) -> dict:
        """The keyword arguments of ``__init__`` holding the new output quantizers."""
        raise NotImplementedError


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
    weights 5x less. The cache is dropped on exit, so a new forward pass quantizes again; in a
    context of the same modules, it is the outer one's.
    """
    modules = [m for m in modules if isinstance(m, _WeightQuantMixin) and not m._weight_cache_enabled]
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
    bfloat16_codes = False  # training convs on bfloat16 integer codes (set_bfloat16_codes)

    def __init__(self, conv: nn.Conv2d, *, weight_quant, input_quant, integer_aware: bool = False):
        """``conv`` with the given quantizers; ``integer_aware`` (scope ``aqd``,
        ``quant.integer_bias``): integer bias and integer BN (AQD Eq. 4-6)."""
        adopt_state(self, conv)
        if not isinstance(conv, Conv2d):  # torch's conv: detectron2's norm and activation unset
            self.norm, self.activation = None, None
        self._init_weight_quant(weight_quant)
        self.input_quant = input_quant
        self.integer_aware = integer_aware

    @classmethod
    def from_float(cls, module, *, name, ctx):
        bits = ctx.layer_bits(name)
        if bits is None:
            return None
        activation = getattr(module, "activation", None)
        if ctx.scope == "aqd" and not (activation is None or isinstance(activation, (nn.ReLU, nn.ReLU6))):
            raise ValueError(
                f"quantize_model: scope 'aqd' keeps BN outputs and adds on integer grids (AQD Eq. 4-8), "
                f"which needs ReLU-family activations after them; {name} applies "
                f"{type(activation).__name__}. Quantize this model with scope 'aqd_star' (LSQ, TQT)."
            )
        weight_bits, act_bits = bits
        return cls(
            module,
            weight_quant=ctx.weight_quantizer(weight_bits, channels=module.out_channels),
            input_quant=ctx.quantizer(act_bits, signed=ctx.input_signed(name)),
            integer_aware=ctx.integer_convs,
        )

    def accumulator_step(self):
        """``alpha_conv = alpha_x * alpha_w`` (AQD Eq. 4): the value of one unit of the integer
        accumulator — a float, or a (C,) float64 tensor with per-channel weights; None while
        fake quantization is off (calibration, FP32 checks)."""
        if not self._fake_quant_active():
            return None
        return self.input_quant.integer_grid().scale * self.weight_quant.integer_grid().scale

    def _fake_quant_active(self) -> bool:
        iq, wq = self.input_quant, self.weight_quant
        return iq.fake_quant_enabled and wq.fake_quant_enabled and iq.is_initialized and wq.is_initialized

    def accumulate(self, x):
        """The conv of the quantized input and weight: ``(eta_conv * alpha_conv, alpha_conv)``
        when integer-aware (Eq. 4; the bias an integer in units of ``alpha_conv``), else
        ``(conv output, None)``. Norm and activation are not applied."""
        x = self.input_quant(x)
        weight = self.quantized_weight()
        acc_step = self.accumulator_step() if self.integer_aware else None
        bias = self.bias
        if acc_step is not None and bias is not None:
            bias = integer_bias(bias, acc_step)  # an int32 bias in units of alpha_conv
        if self.bfloat16_codes and self.training:
            out = self._conv_of_codes(x, weight, bias)
            if out is not None:
                return out, acc_step
        return self._conv_forward(x, weight, bias), acc_step

    def _conv_of_codes(self, x, weight, bias):
        """``conv(x_hat, W_hat) + b`` as ``alpha_x * alpha_w * conv(q_x, q_w) + b`` (AQD Eq. 1, 4)
        with the integer codes ``q = x_hat / alpha`` in bfloat16: bfloat16 (8 significant bits)
        holds every integer up to 256, so every code of a 2-8-bit grid (at most 255 in
        magnitude), and the products are exact; the convolution accumulates in float32 and only
        its output is rounded to bfloat16 (as a bfloat16-autocast FP32 stage's). The scales are
        constants here: the gradients to ``x_hat`` and ``W_hat`` are the float conv's (to
        bfloat16 precision) and reach the steps through the quantizers. None while fake
        quantization is off."""
        if not self._fake_quant_active() or self.padding_mode != "zeros":
            return None
        grid_x, grid_w = self.input_quant.integer_grid(), self.weight_quant.integer_grid()
        scale_x = float(grid_x.scale)
        scale_w = torch.as_tensor(grid_w.scale, dtype=x.dtype).reshape(-1, 1, 1, 1)
        codes_x = (x / scale_x).to(torch.bfloat16)
        codes_w = (weight / scale_w).to(torch.bfloat16)
        acc = F.conv2d(codes_x, codes_w, None, self.stride, self.padding, self.dilation, self.groups)
        out = acc.to(x.dtype) * (scale_w.reshape(1, -1, 1, 1) * scale_x)
        return out if bias is None else out + bias.reshape(1, -1, 1, 1)

    def forward(self, x):
        x, acc_step = self.accumulate(x)
        if self.norm is not None:
            if acc_step is not None and isinstance(self.norm, _OutputQuantBN):
                x = self.norm.from_accumulator(x, acc_step)  # Eq. 5-6, then the output grid
            elif acc_step is not None and self.integer_bn(self.norm):
                x = integer_batch_norm(self.norm, x, acc_step, self.norm.forward)  # Eq. 5-6
            else:
                x = self.norm(x)
        elif acc_step is not None:
            x = round_to_grid(x, acc_step)  # eta_conv * alpha_conv, exactly (Eq. 4)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def integer_bn(self, norm: Optional[nn.Module]) -> bool:
        """Whether ``norm`` (this conv's BN, or one level's BN of a multi-level BN after it)
        computes AQD Eq. 5-6 from this conv's accumulator: an integer-aware conv and a torch BN
        (a frozen BN stays float). The ONNX export folds it the same way."""
        return self.integer_aware and isinstance(norm, nn.modules.batchnorm._BatchNorm)

    def output_quantizer(self):
        """The quantizer whose grid this layer's output lies on (its BN's output quantizer),
        or None."""
        return getattr(self.norm, "output_quant", None) if self.norm is not None else None


@QUANT_MODULES.register()
class QLinear(_WeightQuantMixin, nn.Linear, QuantizedModule):
    """Linear layer with fake-quantized weight and input."""

    float_types = (nn.Linear,)

    def __init__(self, linear: nn.Linear, *, weight_quant, input_quant):
        adopt_state(self, linear)
        self._init_weight_quant(weight_quant)
        self.input_quant = input_quant

    @classmethod
    def from_float(cls, module, *, name, ctx):
        bits = ctx.layer_bits(name)
        if bits is None:
            return None
        return cls(
            module,
            weight_quant=ctx.weight_quantizer(bits[0], channels=module.out_features),
            input_quant=ctx.quantizer(bits[1], signed=ctx.input_signed(name)),
        )

    def forward(self, x):
        return F.linear(self.input_quant(x), self.quantized_weight(), self.bias)


class _OutputQuantBN(_AQDOutputModule):
    """
    BN whose (signed) output is fake-quantized — scope ``aqd`` only. :meth:`forward` is the
    float BN; :meth:`from_accumulator` is AQD's integer BN on the output of an integer-aware
    conv (its conv calls it with the accumulator step it computed).
    """

    def __init__(self, bn: nn.Module, *, output_quant):
        adopt_state(self, bn)
        self.output_quant = output_quant

    @classmethod
    def output_quantizers(cls, module, new_quantizer):
        return {"output_quant": new_quantizer()}

    def forward(self, x):
        return self.output_quant(super().forward(x))

    def from_accumulator(self, x, acc_step):
        """AQD Eq. 6 on ``x = eta_conv * alpha_conv`` with ``acc_step = alpha_conv``:
        ``(eta_conv + round(s)) * alpha_z``, the shift ``s`` rounded straight-through per
        channel, then the output quantizer."""
        return self.output_quant(integer_batch_norm(self, x, acc_step, super().forward))


@QUANT_MODULES.register()
class QBatchNorm2d(_OutputQuantBN, nn.BatchNorm2d):
    float_types = (nn.BatchNorm2d,)


@QUANT_MODULES.register()
class QSyncBatchNorm(_OutputQuantBN, nn.SyncBatchNorm):
    float_types = (nn.SyncBatchNorm,)


@QUANT_MODULES.register()
class QNaiveSyncBatchNorm(_OutputQuantBN, NaiveSyncBatchNorm):
    float_types = (NaiveSyncBatchNorm,)


def _output_quantizer(module):
    return module.output_quantizer() if isinstance(module, QConv2d) else None


def _active_grid(quantizer):
    if quantizer is None or not (quantizer.fake_quant_enabled and quantizer.is_initialized):
        return None
    return quantizer.integer_grid()


def add_alignment(quantizer1, quantizer2) -> Optional[AddAlignment]:
    """The Eq. 7 alignment of an add whose inputs lie on the grids of ``quantizer1`` and
    ``quantizer2`` (:func:`~.integer_layers.align_add`), or None (plain add) when either is
    missing or not fake-quantizing."""
    g1, g2 = _active_grid(quantizer1), _active_grid(quantizer2)
    if g1 is None or g2 is None:
        return None
    return _cached_align_add(g1.scale, g2.scale, g1.max_abs, g2.max_abs)


@functools.lru_cache(maxsize=4096)
def _cached_align_add(alpha1, alpha2, max_abs1, max_abs2):
    return align_add(alpha1, alpha2, max_abs1, max_abs2)


def set_integer_aware(model: nn.Module, enabled: bool = True) -> nn.Module:
    """
    Turn the integer-aware arithmetic of scope ``"aqd"`` (AQD Eq. 4-7: integer conv biases and
    accumulators, integer BN, aligned adds) on or off in every layer of ``model``; off = the
    plain fake-quant simulation (float BN, float biases and sums, outputs still quantized), for
    ablations and benchmarks. Models of scope ``aqd`` are built with it on.
    """
    for m in model.modules():
        if isinstance(m, (QConv2d, _QuantAddBlock, QFPN)):
            m.integer_aware = bool(enabled)
    return model


def set_bfloat16_codes(model: nn.Module, enabled: bool = True) -> nn.Module:
    """
    Let every quantized conv of ``model`` compute, while training, on its integer codes in
    bfloat16 (:meth:`QConv2d._conv_of_codes`): bfloat16 convolution kernels on integers it holds
    exactly, for quantization-aware training with ``train.amp.enabled`` on a CPU with native
    bfloat16 (:mod:`hqod.engine.amp`). Evaluation and the quantizers stay float32.
    """
    for m in model.modules():
        if isinstance(m, QConv2d):
            m.bfloat16_codes = bool(enabled)
    return model


class _QuantAddBlock(_AQDOutputModule):
    """
    Residual block whose sum is fake-quantized (scope ``aqd``: ``add_quant``), the two branches
    aligned as AQD Eq. 7 does (:func:`add_alignment`); for ResNet's blocks before the last ReLU
    (:meth:`_residual`). Its convs (and their BN) are converted as children.
    """

    integer_aware = True  # Eq. 7 alignment (False: the plain float sum, set_integer_aware)

    def __init__(self, block: nn.Module, *, add_quant):
        adopt_state(self, block)
        self.add_quant = add_quant

    @classmethod
    def output_quantizers(cls, module, new_quantizer):
        return {"add_quant": new_quantizer()}

    def shortcut_quantizer(self, input_quant):
        """The quantizer whose grid the shortcut's output lies on: the shortcut conv's BN output
        quantizer, or for an identity shortcut ``input_quant``, that of the block's input."""
        if self.shortcut is not None:
            return _output_quantizer(self.shortcut)
        return input_quant

    def _residual(self, x, out, last_conv, input_quant):
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        alignment = (
            add_alignment(_output_quantizer(last_conv), self.shortcut_quantizer(input_quant))
            if self.integer_aware else None
        )
        return F.relu(self.add_quant(aligned_add(out, shortcut, alignment)))


@QUANT_MODULES.register()
class QBasicBlock(_QuantAddBlock, BasicBlock):
    float_types = (BasicBlock,)

    def forward(self, x, input_quant=None):
        out = F.relu_(self.conv1(x))
        return self._residual(x, self.conv2(out), self.conv2, input_quant)


@QUANT_MODULES.register()
class QBottleneckBlock(_QuantAddBlock, BottleneckBlock):
    float_types = (BottleneckBlock,)

    def forward(self, x, input_quant=None):
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        return self._residual(x, self.conv3(out), self.conv3, input_quant)


class _AQDNetwork(QuantizedModule):
    """A network converted under scope ``aqd`` only, the same state as the float one, whose
    forward hands each quantized residual block the quantizer its input lies on."""

    def __init__(self, net: nn.Module):
        adopt_state(self, net)

    @classmethod
    def from_float(cls, module, *, name, ctx):
        return cls(module) if ctx.scope == "aqd" else None


@QUANT_MODULES.register()
class QResNet(_AQDNetwork, ResNet):
    """
    detectron2's ResNet (scope ``aqd``) whose forward hands each quantized residual block the
    quantizer whose grid the block's input lies on (:meth:`block_inputs`): the scale of an
    identity shortcut in Eq. 7. Otherwise ``ResNet.forward`` of detectron2 v0.6 (unchanged in
    later versions).
    """

    float_types = (ResNet,)

    def block_inputs(self):
        """``(block, input quantizer)`` for every block in order: the quantizer of the stem's BN
        output, then of each quantized block's add (None after a block that is not one)."""
        prev = _output_quantizer(getattr(self.stem, "conv1", None))
        for stage in self.stages:
            for block in stage:
                yield block, prev
                prev = block.add_quant if isinstance(block, _QuantAddBlock) else None

    def forward(self, x):
        assert x.dim() == 4, f"ResNet takes an input of shape (N, C, H, W). Got {x.shape} instead!"
        outputs = {}
        x = self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        blocks = self.block_inputs()
        for name, stage in zip(self.stage_names, self.stages):
            for block, input_quant in itertools.islice(blocks, len(stage)):
                x = block(x, input_quant) if isinstance(block, _QuantAddBlock) else block(x)
            if name in self._out_features:
                outputs[name] = x
        if self.num_classes is not None:
            x = self.linear(torch.flatten(self.avgpool(x), 1))
            if "linear" in self._out_features:
                outputs["linear"] = x
        return outputs


@QUANT_MODULES.register()
class QInvertedResidual(_QuantAddBlock, InvertedResidual):
    """
    MobileNetV2's block with a residual (scope ``aqd``): the sum of the linear projection and
    the block's input fake-quantized, the two aligned as AQD Eq. 7 does; no activation after it
    (linear bottleneck). A block without residual is left as it is (its convs are converted as
    children).
    """

    float_types = (InvertedResidual,)

    @classmethod
    def from_float(cls, module, *, name, ctx):
        return super().from_float(module, name=name, ctx=ctx) if module.use_residual else None

    def forward(self, x, input_quant=None):
        """``input_quant``: the quantizer whose grid ``x`` lies on (:meth:`QMobileNetV2.block_inputs`)."""
        out = self.conv(x)
        alignment = add_alignment(_output_quantizer(self.conv[-1]), input_quant) if self.integer_aware else None
        return self.add_quant(aligned_add(out, x, alignment))


@QUANT_MODULES.register()
class QMobileNetV2(_AQDNetwork, MobileNetV2):
    """
    MobileNetV2 (scope ``aqd``) whose forward hands each quantized residual block the quantizer
    whose grid the block's input lies on (:meth:`block_inputs`), as :class:`QResNet` does.
    """

    float_types = (MobileNetV2,)

    def block_inputs(self):
        """``(block, input quantizer)`` for every block in order: a block's input is the output
        of the block before, its add's quantizer or, without residual, its projection's BN
        output quantizer (None for the first block, which reads the stem's ReLU6)."""
        prev = None
        for name in self.stage_names:
            for block in getattr(self, name):
                yield block, prev
                prev = block.add_quant if isinstance(block, QInvertedResidual) else _output_quantizer(block.conv[-1])

    def forward(self, x):
        outputs = {}
        blocks = self.block_inputs()
        for name in self._layers:
            layer = getattr(self, name)
            if name in self.stage_names:
                for block, input_quant in itertools.islice(blocks, len(layer)):
                    x = block(x, input_quant) if isinstance(block, QInvertedResidual) else block(x)
            else:
                x = layer(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs


@QUANT_MODULES.register()
class QFPN(FPN, _AQDOutputModule):
    """detectron2's FPN whose top-down sums (lateral + upsampled) are fake-quantized (scope
    ``aqd``), the two inputs aligned as AQD Eq. 7 does. Same computation as ``FPN.forward`` of
    detectron2 v0.6 (unchanged in later versions), with the upsampling and the add as methods
    (:meth:`upsample`, :meth:`fuse`) that the integer engine's FPN replaces."""

    float_types = (FPN,)
    integer_aware = True  # Eq. 7 alignment of the top-down adds (set_integer_aware)

    def __init__(self, fpn: FPN, *, fuse_quants: nn.ModuleList):
        adopt_state(self, fpn)
        self.fuse_quants = fuse_quants

    @classmethod
    def output_quantizers(cls, module, new_quantizer):
        return {"fuse_quants": nn.ModuleList(new_quantizer() for _ in range(len(module.lateral_convs) - 1))}

    def top_down_quantizer(self, idx: int):
        """The quantizer of the top-down input of the add at ``idx`` (1 = the coarsest)."""
        if idx == 1:
            return _output_quantizer(self.lateral_convs[0])
        return self.fuse_quants[idx - 2]

    def upsample(self, x):
        """The top-down path's 2x nearest upsampling."""
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    def fuse(self, idx: int, lateral, top_down):
        """The top-down add at ``idx`` (1 = the coarsest): aligned (Eq. 7), then quantized."""
        alignment = (
            add_alignment(_output_quantizer(self.lateral_convs[idx]), self.top_down_quantizer(idx))
            if self.integer_aware else None
        )
        fused = aligned_add(lateral, top_down, alignment)
        if self._fuse_type == "avg":
            fused = fused / 2
        return self.fuse_quants[idx - 1](fused)

    def forward(self, x):
        bottom_up_features = self.bottom_up(x)
        results = []
        prev_features = self.lateral_convs[0](bottom_up_features[self.in_features[-1]])
        results.append(self.output_convs[0](prev_features))
        for idx in range(1, len(self.lateral_convs)):
            features = self.lateral_convs[idx](bottom_up_features[self.in_features[-idx - 1]])
            prev_features = self.fuse(idx, features, self.upsample(prev_features))
            results.insert(0, self.output_convs[idx](prev_features))
        if self.top_block is not None:
            if self.top_block.in_feature in bottom_up_features:
                top_block_in_feature = bottom_up_features[self.top_block.in_feature]
            else:
                top_block_in_feature = results[self._out_features.index(self.top_block.in_feature)]
            results.extend(self.top_block(top_block_in_feature))
        assert len(self._out_features) == len(results)
        return {f: res for f, res in zip(self._out_features, results)}
