import re
from typing import Optional

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import ResNet


def resnet_stages(depth: int, norm="BN", stride_in_1x1: bool = False):
    """
    The stages of a ResNet of the given depth (18, 34, 50, 101, 152), for LazyConfig.

    Wraps :meth:`ResNet.make_default_stages` so that changing only ``depth`` in a config switches
    between BasicBlock (18/34) and BottleneckBlock (50+) ResNets: ``stride_in_1x1`` exists only for
    bottlenecks. It is False for torchvision checkpoints (stride in the 3x3 conv) and True for
    detectron2's MSRA checkpoints.
    """
    if depth not in (18, 34, 50, 101, 152):
        raise ValueError(f"ResNet depth must be one of 18, 34, 50, 101, 152; got {depth!r}")
    kwargs = {"stride_in_1x1": stride_in_1x1} if depth >= 50 else {}
    return ResNet.make_default_stages(depth, norm=norm, **kwargs)


def level_shapes(channels, num_levels: int = 5):
    """The head's input shapes, for LazyConfig, so that the widths are set in one place:
    ``[ShapeSpec(channels=channels)] * num_levels`` for one width (``model.backbone.out_channels``
    of an FPN), one ShapeSpec per entry for a list of per-level widths (SSD-lite's levels)."""
    if isinstance(channels, int):
        return [ShapeSpec(channels=channels)] * num_levels
    return [ShapeSpec(channels=c) for c in channels]


_DEPTHS = {  # (blocks per stage res2..res5, bottleneck) -> depth, as ResNet.make_default_stages
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}
_BLOCK_KEY = re.compile(r"(?:^|\.)res([2-5])\.(\d+)\.conv(\d)\.")


def resnet_depth(keys) -> Optional[int]:
    """The depth of the detectron2 ResNet whose state-dict ``keys`` these are (a bare backbone,
    ``res2.0.conv1.weight``, or inside a detector, ``backbone.bottom_up.res2.0...``); None when
    the keys hold no complete ResNet of a standard depth."""
    blocks, bottleneck = {}, False
    for key in keys:
        m = _BLOCK_KEY.search(key)
        if m:
            stage, block, conv = (int(g) for g in m.groups())
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
            bottleneck |= conv == 3
    counts = tuple(blocks.get(s, 0) for s in (2, 3, 4, 5))
    return _DEPTHS.get((counts, bottleneck))
