"""
The integer network: detectron2's ResNet + FPN (:class:`IntegerResNet`, :class:`IntegerFPN`:
the quantized model's own structure and forward, with integer units in place of its layers)
and a multi-level dense head (:class:`IntegerHead`) computed with the operations of :mod:`.ops`.
"""
from typing import Dict, List, Optional

from torch import Tensor, nn

from ...utils import adopt_state, replace_child
from ..modules import QFPN, QResNet
from ..multilevel import MultiLevelHead
from .ops import IntAdd, IntConvUnit, IntQuantizeInput, max_pool, relu, relu_, scale_output, upsample2

__all__ = ["IntStem", "IntBlock", "IntegerResNet", "IntegerFPN", "IntegerTower", "IntegerHead"]


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
    leave the network multiplied by their scales (``output_scales``: a float, or one per channel
    with per-channel weights) — the only float multiply of the head. Returns the float head's
    structure (one list per output, one tensor per level).
    """

    def __init__(self, head: MultiLevelHead, *, towers: Dict[str, IntegerTower], predictors: Dict[str, IntConvUnit]):
        adopt_state(self, head)
        for name, module in {**towers, **predictors}.items():
            replace_child(self, name, module)
        self.output_names = list(self.spec.predictors)
        self.output_scales = [predictors[k].acc_scale for k in self.output_names]

    def predict(self, name: str, x: Tensor, level: int) -> Tensor:
        return self._modules[name](x, level)

    def forward_integer(self, features: List[Tensor]) -> List[List[Tensor]]:
        """The predictors' integer outputs (int64), per output and level."""
        return list(super().forward(features))

    def forward(self, features: List[Tensor]):
        if self.training:
            raise RuntimeError("The integer-only model is for inference: call .eval().")
        outs = self.forward_integer(features)
        # where the outputs leave the network: the per-output scale alpha_conv, applied once
        return tuple([scale_output(q, scale) for q in per_level] for per_level, scale in zip(outs, self.output_scales))
