"""RetinaNet with the HQOD losses (HQOD Eq. 9 on top of detectron2's RetinaNet losses)."""
from detectron2.modeling.meta_arch.build import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet

from .hqod_mixin import HQODLossMixin

__all__ = ["HQODRetinaNet"]


@META_ARCH_REGISTRY.register()
class HQODRetinaNet(HQODLossMixin, RetinaNet):
    """
    :class:`RetinaNet` with ``loss_tcorr`` and ``loss_hiou`` (:class:`HQODLossMixin`): p is the
    score of the ground-truth class of each positive anchor (ignored anchors excluded), u the IoU
    of its decoded box with the matched box; the terms are divided by RetinaNet's box-loss
    normalizer, the EMA of the number of positives. Also built from a yacs config
    (``MODEL.HQOD.*``).
    """
