"""RetinaNet, ResNet-18 + FPN, BN in backbone, FPN and head (the setting of AQD and HQOD).

Other depths: ``model.backbone.bottom_up.stages.depth = 34`` (or 50). P6/P7 come from P5 so that
nothing else depends on the depth; the FPN width ``model.backbone.out_channels`` sets the head's. The head uses detectron2's per-level ("domain-specific") BN;
the quantization package swaps it for multi-level BN indexed by level.
"""
from detectron2.config import LazyCall as L
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch import RetinaNet
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

from hqod.modeling import level_shapes, resnet_stages

model = L(RetinaNet)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="BN"),
            stages=L(resnet_stages)(depth=18, norm="BN"),
            out_features=["res3", "res4", "res5"],
            freeze_at=0,
        ),
        in_features=["res3", "res4", "res5"],
        out_channels=256,
        norm="BN",
        top_block=L(LastLevelP6P7)(
            in_channels="${..out_channels}", out_channels="${..out_channels}", in_feature="p5"
        ),
    ),
    head=L(RetinaNetHead)(
        input_shape=L(level_shapes)(channels="${...backbone.out_channels}"),
        num_classes="${..num_classes}",
        conv_dims=["${...backbone.out_channels}"] * 4,
        norm="BN",
        prior_prob=0.01,
        num_anchors=9,
    ),
    anchor_generator=L(DefaultAnchorGenerator)(
        sizes=[[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [32, 64, 128, 256, 512]],
        aspect_ratios=[0.5, 1.0, 2.0],
        strides=[8, 16, 32, 64, 128],
        offset=0.0,
    ),
    box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
    anchor_matcher=L(Matcher)(
        thresholds=[0.4, 0.5], labels=[0, -1, 1], allow_low_quality_matches=True
    ),
    num_classes=80,
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    focal_loss_alpha=0.25,
    focal_loss_gamma=2.0,
    # torchvision's RGB normalization (its ResNet checkpoints expect it). For detectron2's MSRA
    # checkpoints use input_format="BGR", pixel_mean=[103.530, 116.280, 123.675], pixel_std=[1.0]*3.
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    input_format="RGB",
)
