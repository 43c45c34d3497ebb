"""FCOS, ResNet-18 + FPN, BN in backbone, FPN and head; same backbone as ``retinanet.py``.

``hqod.modeling.FCOS`` is detectron2's FCOS that also trains on images without instances under
detectron2 v0.6 (identical otherwise)."""
from detectron2.modeling.meta_arch.fcos import FCOSHead

from hqod.modeling import FCOS

from .retinanet import model

model._target_ = FCOS
del model.anchor_generator
del model.box2box_transform
del model.anchor_matcher
del model.input_format  # FCOS takes no input_format: the mapper's image_format decides

# New score threshold determined based on sqrt(cls_score * centerness), as detectron2's FCOS.
model.test_score_thresh = 0.2
model.test_nms_thresh = 0.6

model.head._target_ = FCOSHead
del model.head.num_anchors
