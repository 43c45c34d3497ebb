"""
The integer network: detectron2's ResNet + FPN (:class:`IntegerBackbone`) and a multi-level
dense head (:class:`IntegerHead`) computed with the operations of :mod:`.ops`.
"""
from typing import Dict, List, Optional

from torch import Tensor, nn

from .ops import IntAdd, IntConvUnit, IntQuantizeInput, max_pool, relu, relu_, scale_output, upsample2

__all__ = ["IntStem", "IntBlock", "IntegerBackbone", "IntTopBlock", "IntegerHead", "IntReLU"]


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


class IntegerBackbone(nn.Module):
    """
    detectron2's ResNet + FPN (+ P6/P7) in integers: ``forward(image)`` takes the normalized
    float image and returns ``{name: int64 tensor}``; ``feature_scales[name]`` and
    ``feature_max_abs[name]`` are the scales and integer bounds of those features.
    """

    def __init__(self, *, stem, stages, stage_names, bottom_up_out, in_features, laterals, outputs, adds,
                 top_block, top_block_in, out_features, feature_scales, feature_max_abs,
                 size_divisibility, padding_constraints, output_shapes):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.stage_names = list(stage_names)
        self.bottom_up_out = list(bottom_up_out)
        self.in_features = list(in_features)
        self.laterals = nn.ModuleList(laterals)
        self.outputs = nn.ModuleList(outputs)
        self.adds = nn.ModuleList(adds)
        self.top_block = top_block
        self.top_block_in = top_block_in
        self.out_features = list(out_features)
        self.feature_scales = dict(feature_scales)
        self.feature_max_abs = dict(feature_max_abs)
        self._size_divisibility = size_divisibility
        self._padding_constraints = dict(padding_constraints or {})
        self._output_shapes = dict(output_shapes)

    @property
    def size_divisibility(self):
        return self._size_divisibility

    @property
    def padding_constraints(self):
        return self._padding_constraints

    def output_shape(self):
        return dict(self._output_shapes)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        if self.training:
            raise RuntimeError("The integer-only model is for inference: call .eval().")
        q = self.stem(x)
        bottom_up = {}
        for name, stage in zip(self.stage_names, self.stages):
            q = stage(q)
            if name in self.bottom_up_out:
                bottom_up[name] = q
        results = []
        prev = self.laterals[0](bottom_up[self.in_features[-1]])
        results.append(self.outputs[0](prev))
        for idx in range(1, len(self.laterals)):
            lateral = self.laterals[idx](bottom_up[self.in_features[-idx - 1]])
            prev = self.adds[idx - 1](lateral, upsample2(prev))
            results.insert(0, self.outputs[idx](prev))
        out = dict(zip(self.out_features, results))
        if self.top_block is not None:
            src = bottom_up[self.top_block_in] if self.top_block_in in bottom_up else out[self.top_block_in]
            p6 = self.top_block.p6(src)
            out["p6"] = p6
            out["p7"] = self.top_block.p7(relu(p6))
        return {name: out[name] for name in self.out_features + (["p6", "p7"] if self.top_block is not None else [])}


class IntTopBlock(nn.Module):
    def __init__(self, p6: IntConvUnit, p7: IntConvUnit):
        super().__init__()
        self.p6, self.p7 = p6, p7


class IntegerHead(nn.Module):
    """
    A multi-level head in integers: per FPN level, the towers (conv, integer BN of that level,
    requantization, ReLU) and the predictors, whose int32 outputs leave the network multiplied by
    their scales (``output_scales``: a float, or one per channel with per-channel weights) — the
    only float multiply of the head. Returns the
    float head's structure (one list per output, one tensor per level).
    """

    def __init__(self, towers: Dict[str, List[nn.Module]], predictors: Dict[str, IntConvUnit], predictor_inputs: Dict[str, str]):
        super().__init__()
        self.towers = nn.ModuleDict({k: nn.ModuleList(v) for k, v in towers.items()})
        self.predictors = nn.ModuleDict(predictors)
        self.predictor_inputs = dict(predictor_inputs)
        self.output_names = list(predictor_inputs)
        self.output_scales = [predictors[k].acc_scale for k in self.output_names]

    def forward_integer(self, features: List[Tensor]) -> List[List[Tensor]]:
        """The predictors' integer outputs (int64), per output and level."""
        outs = {k: [] for k in self.output_names}
        for level, feature in enumerate(features):
            tower_out = {}
            for name, tower in self.towers.items():
                q = feature
                for op in tower:
                    if isinstance(op, IntConvUnit):
                        q = op(q, level)
                    else:
                        q = relu(q) if q is feature else relu_(q)
                tower_out[name] = q
            for k in self.output_names:
                outs[k].append(self.predictors[k](tower_out[self.predictor_inputs[k]], level))
        return [outs[k] for k in self.output_names]

    def forward(self, features: List[Tensor]):
        if self.training:
            raise RuntimeError("The integer-only model is for inference: call .eval().")
        outs = self.forward_integer(features)
        # where the outputs leave the network: the per-output scale alpha_conv, applied once
        return tuple([scale_output(q, scale) for q in per_level] for per_level, scale in zip(outs, self.output_scales))


class IntReLU(nn.Module):
    def forward(self, q, level=0):
        return relu_(q)

