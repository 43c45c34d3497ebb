"""
The integer network: detectron2's ResNet + FPN (:class:`IntegerResNet`, :class:`IntegerFPN`)
and MobileNetV2 + SSD-lite's extra levels (:class:`IntegerMobileNetV2`,
:class:`IntegerSSDLiteNeck`) — the quantized model's own structure and forward, with integer
units in place of its layers — and the dense heads, shared over levels
(:class:`IntegerHead`) or one per level (:class:`IntegerPerLevelHead`), computed with the
operations of :mod:`.ops`.
"""
from typing import Dict, List, Optional

from torch import Tensor, nn

from hqod.modeling.mobilenet import MobileNetV2, SSDLiteNeck

from ...utils import adopt_state, replace_child
from ..modules import QFPN, QMobileNetV2, QResNet
from ..multilevel import MultiLevelHead
from .ops import IntAdd, IntConvUnit, IntQuantizeInput, max_pool, relu, relu_, scale_output, upsample2

__all__ = [
    "IntStem", "IntBlock", "IntegerResNet", "IntegerFPN", "IntegerTower", "IntegerHead", "IntConvChain",
    "IntInvertedResidual", "IntegerMobileNetV2", "IntegerSSDLiteNeck", "IntegerPerLevelHead",
]


class IntStem(nn.Module):
    def __init__(self, entry: IntQuantizeInput, unit: IntConvUnit):
        super().__init__()
        self.entry, self.unit = entry, unit

    def forward(self, x: Tensor) -> Tensor:
        q = relu_(self.unit(self.entry(x)))
        return max_pool(q, kernel_size=3, stride=2, padding=1)


class IntBlock(nn.Module):
    """A ResNet basic or bottleneck block: convs (ReLU between), shortcut (conv or identity),
    the Eq. 7 add, ReLU."""

    def __init__(self, convs: List[IntConvUnit], shortcut: Optional[IntConvUnit], add: IntAdd):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.shortcut = shortcut
        self.add = add

    def forward(self, q: Tensor) -> Tensor:
        out = q
        for i, unit in enumerate(self.convs):
            out = unit(out)
            if i < len(self.convs) - 1:
                out = relu_(out)
        sc = self.shortcut(q) if self.shortcut is not None else q
        return relu_(self.add(out, sc))


class IntegerResNet(QResNet):
    """The quantized ResNet (its structure, names and ``forward``) with the stem and the
    blocks computing on integers (:class:`IntStem`, :class:`IntBlock`)."""

    def __init__(self, resnet: QResNet, *, stem: IntStem, stages: List[List[IntBlock]]):
        adopt_state(self, resnet)
        self.stem = stem
        for name, blocks in zip(self.stage_names, stages):
            replace_child(self, name, nn.Sequential(*blocks))  # new stages: ``resnet`` keeps its own


class IntegerFPN(QFPN):
    """
    The quantized FPN (+ P6/P7; its structure, names and ``forward``) on integers: laterals,
    outputs and the top block's convs are :class:`IntConvUnit`, the bottom-up network an
    :class:`IntegerResNet`, the top-down adds :class:`IntAdd` (Eq. 7), the upsampling exact
    on integers. ``forward(image)`` takes the normalized float image and returns
    ``{name: int64 tensor}``; ``feature_scales[name]`` and ``feature_max_abs[name]`` are the
    scales and integer bounds of those features.
    """

    def __init__(self, fpn: QFPN, *, bottom_up: IntegerResNet, laterals: List[IntConvUnit], outputs: List[IntConvUnit],
                 adds: List[IntAdd], top_block: Optional[nn.Module], feature_scales, feature_max_abs):
        adopt_state(self, fpn)
        names = {id(m): n for n, m in fpn.named_children()}
        for old, new in zip(fpn.lateral_convs + fpn.output_convs, laterals + outputs):
            replace_child(self, names[id(old)], new)
        self.bottom_up = bottom_up
        self.top_block = top_block
        del self.fuse_quants
        self.adds = nn.ModuleList(adds)
        self.feature_scales = dict(feature_scales)
        self.feature_max_abs = dict(feature_max_abs)

    def upsample(self, q):
        return upsample2(q)

    def fuse(self, idx: int, lateral, top_down):
        return self.adds[idx - 1](lateral, top_down)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        if self.training:
            raise RuntimeError("The integer-only model is for inference: call .eval().")
        return super().forward(x)


class IntegerTower(nn.Sequential):
    """A head tower on integers, called as the quantized tower is (``tower(q, level)``): conv
    units (conv + the level's integer BN + requantization) and ``nn.ReLU`` (applied on the
    integers)."""

    def forward(self, q: Tensor, level: int) -> Tensor:
        x = q
        for op in self:
            if isinstance(op, IntConvUnit):
                x = op(x, level)
            else:  # a ReLU: in place, except on the tower's input
                x = relu(x) if x is q else relu_(x)
        return x


class IntegerHead(MultiLevelHead):
    """
    The quantized multi-level head (its declaration, names and ``forward``) on integers: its
    towers are :class:`IntegerTower`, its predictors :class:`IntConvUnit`, whose int32 outputs
    leave the network multiplied by their scales (``output_scales``, per output and level: a
    float, or one per channel with per-channel weights) — the only float multiply of the head.
    Returns the float head's structure (one list per output, one tensor per level).
    """

    def __init__(self, head: MultiLevelHead, *, towers: Dict[str, IntegerTower], predictors: Dict[str, IntConvUnit]):
        adopt_state(self, head)
        for name, module in {**towers, **predictors}.items():
            replace_child(self, name, module)
        self.output_names = list(self.spec.predictors)
        # per output and level (the same predictor on every level)
        self.output_scales = [[predictors[k].acc_scale] * self.num_levels for k in self.output_names]

    def predict(self, name: str, x: Tensor, level: int) -> Tensor:
        return self._modules[name](x, level)

    def forward_integer(self, features: List[Tensor]) -> List[List[Tensor]]:
        """The predictors' integer outputs (int64), per output and level."""
        return list(super().forward(features))

    def forward(self, features: List[Tensor]):
        if self.training:
            raise RuntimeError("The integer-only model is for inference: call .eval().")
        return scale_outputs(self.forward_integer(features), self.output_scales)


def scale_outputs(outputs: List[List[Tensor]], scales: List[List[object]]):
    """Where the head's outputs leave the network: each predictor's integers (per output and
    level) times its scale ``alpha_conv``, the only float multiply of an integer head."""
    return tuple([scale_output(q, s) for q, s in zip(per_level, level_scales)] for per_level, level_scales in zip(outputs, scales))


class IntConvChain(nn.Module):
    """
    Quantized convs in sequence, each followed by its activation (MobileNetV2's stem, blocks and
    last conv, SSD-lite's extra levels and head towers), with the entry quantizer first where
    the float image comes in. ReLU and ReLU6 clip at zero on the integers; ReLU6's clip at 6,
    a value between two levels of the BN output grid, is applied where the next conv
    requantizes its input (its input grid's top level lowered to the level of 6: exact, as
    requantization is monotone, ``Q(min(x, 6)) = min(Q(x), Q(6))``).
    """

    def __init__(self, units: List[IntConvUnit], relus: List[bool], entry: Optional[IntQuantizeInput] = None):
        super().__init__()
        self.entry = entry
        self.units = nn.ModuleList(units)
        self.relus = list(relus)

    def forward(self, x: Tensor) -> Tensor:
        q = self.entry(x) if self.entry is not None else x
        for unit, clip in zip(self.units, self.relus):
            q = unit(q)
            if clip:
                q = relu_(q)
        return q


class IntInvertedResidual(nn.Module):
    """MobileNetV2's block with a residual: its convs, then the Eq. 7 add of the projection
    and the block's input (no activation after it)."""

    def __init__(self, convs: IntConvChain, add: IntAdd):
        super().__init__()
        self.conv, self.add = convs, add

    def forward(self, q: Tensor) -> Tensor:
        return self.add(self.conv(q), q)


class IntegerMobileNetV2(QMobileNetV2):
    """The quantized MobileNetV2 (its structure, names and float ``forward``) with the stem,
    the blocks and the last conv computing on integers; returns ``{name: int64 tensor}``."""

    def __init__(self, net: QMobileNetV2, *, stem: IntConvChain, stages: List[List[nn.Module]], conv_last: IntConvChain):
        adopt_state(self, net)
        self.stem, self.conv_last = stem, conv_last
        for name, blocks in zip(self.stage_names, stages):
            replace_child(self, name, nn.Sequential(*blocks))

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        if self.training:
            raise RuntimeError("The integer-only model is for inference: call .eval().")
        return MobileNetV2.forward(self, x)  # each block takes its input's integers as they are


class IntegerSSDLiteNeck(SSDLiteNeck):
    """SSD-lite's feature pyramid (its structure, names and ``forward``) on integers: an
    :class:`IntegerMobileNetV2` and the extra levels as :class:`IntConvChain`;
    ``feature_scales`` / ``feature_max_abs`` as :class:`IntegerFPN`'s."""

    def __init__(self, neck: SSDLiteNeck, *, bottom_up: IntegerMobileNetV2, extras: List[IntConvChain], feature_scales, feature_max_abs):
        adopt_state(self, neck)
        self.bottom_up = bottom_up
        self.extras = nn.ModuleList(extras)
        self.feature_scales = dict(feature_scales)
        self.feature_max_abs = dict(feature_max_abs)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        if self.training:
            raise RuntimeError("The integer-only model is for inference: call .eval().")
        return super().forward(x)


class IntegerPerLevelHead(nn.Module):
    """
    A declared dense head with its own towers and predictors on each level (``shared=False``,
    e.g. SSD-lite's) on integers: the head's children under the same names, each tower an
    :class:`IntConvChain` and each predictor an :class:`IntConvUnit` per level; ``forward``
    returns the float head's structure (one list per output, one tensor per level), the
    predictors' integers times their scales (``output_scales``, per output and level).
    """

    def __init__(self, head: nn.Module, *, spec, towers: Dict[str, List[IntConvChain]], predictors: Dict[str, List[IntConvUnit]]):
        super().__init__()
        self.spec = spec
        self.float_type = type(head)
        for name, per_level in {**towers, **predictors}.items():
            self.add_module(name, nn.ModuleList(per_level))
        self.output_names = list(spec.predictors)
        self.output_scales = [[unit.acc_scale for unit in predictors[k]] for k in self.output_names]

    def forward_integer(self, features: List[Tensor]) -> List[List[Tensor]]:
        """The predictors' integer outputs (int64), per output and level."""
        towers = {name: [tower(q) for tower, q in zip(self._modules[name], features)] for name in self.spec.towers}
        return [[unit(q) for unit, q in zip(self._modules[p], towers[t])] for p, t in self.spec.predictors.items()]

    def forward(self, features: List[Tensor]):
        if self.training:
            raise RuntimeError("The integer-only model is for inference: call .eval().")
        return scale_outputs(self.forward_integer(features), self.output_scales)

    def extra_repr(self):
        return f"integer {self.float_type.__qualname__}, {len(self.output_scales[0])} levels, predictors={self.spec.predictors}"
