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


def level_shapes(channels: int, num_levels: int = 5):
    """``[ShapeSpec(channels=channels)] * num_levels``: the head's input shapes, for LazyConfig,
    so that the FPN width is set in one place (``model.backbone.out_channels``)."""
    return [ShapeSpec(channels=channels)] * num_levels
