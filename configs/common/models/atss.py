"""ATSS, ResNet-18 + FPN, BN in backbone, FPN and head; same backbone as ``retinanet.py``.

As MMDetection's ``atss_r50_fpn_1x_coco`` (the HQOD paper's ATSS): one anchor of size 8 * stride
per location, top-9 candidates per level, box coding weights (10, 10, 5, 5), GIoU loss weight 2,
score threshold 0.05 and NMS 0.6 at test time. The head keeps detectron2's per-level BN; the FPN
width ``model.backbone.out_channels`` sets the head's.
"""
from detectron2.config import LazyCall as L
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform

from hqod.modeling import level_shapes
from hqod.modeling.meta_arch import ATSS, ATSSHead

from .retinanet import model as _retinanet

_strides = [8, 16, 32, 64, 128]

model = L(ATSS)(
    backbone=_retinanet.backbone,
    head=L(ATSSHead)(
        input_shape=L(level_shapes)(channels="${...backbone.out_channels}"),
        num_classes="${..num_classes}",
        conv_dims=["${...backbone.out_channels}"] * 4,
        norm="BN",
        prior_prob=0.01,
        num_anchors=1,
    ),
    anchor_generator=L(DefaultAnchorGenerator)(
        sizes=[[8 * s] for s in _strides],
        aspect_ratios=[1.0],
        strides=_strides,
        offset=0.0,
    ),
    box2box_transform=L(Box2BoxTransform)(weights=[10.0, 10.0, 5.0, 5.0]),
    num_classes=80,
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    topk=9,
    focal_loss_alpha=0.25,
    focal_loss_gamma=2.0,
    box_reg_loss_weight=2.0,
    test_score_thresh=0.05,
    test_topk_candidates=1000,
    test_nms_thresh=0.6,
    max_detections_per_image=100,
    pixel_mean=_retinanet.pixel_mean,
    pixel_std=_retinanet.pixel_std,
    input_format=_retinanet.input_format,
)
