from .backbone import level_shapes, resnet_stages

__all__ = ["level_shapes", "resnet_stages"]
