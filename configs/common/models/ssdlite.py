"""SSD-lite, MobileNetV2 (the HQOD authors' COCO setting, ../shared/notes/lightweight-detectors.md):
MobileNetV2's ``layer5`` (96 channels, stride 16) and ``conv_last`` (1280, stride 32) plus four
extra levels (512, 256, 256, 128), a depthwise-separable head per level, 6 priors per location
(aspect ratios 2 and 3), SSD's matching at IoU 0.5, hard negative mining 3:1 and the box coder's
variances 0.1 / 0.2; the prior sizes of the 320-px input (the detector configs take the levels
and priors from the dataset preset: ``ssd_in_features``, ``ssd_extra_channels``,
``ssd_level_channels``, ``ssd_strides``, ``ssd_min_sizes``, ``ssd_max_sizes``)."""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher

from hqod.modeling import SSD, MobileNetV2, SSDAnchorGenerator, SSDLiteHead, SSDLiteNeck

EXTRA_CHANNELS = [512, 256, 256, 128]

model = L(SSD)(
    backbone=L(SSDLiteNeck)(
        bottom_up=L(MobileNetV2)(out_features=["layer5", "conv_last"], width_mult=1.0, norm="BN"),
        in_features=["layer5", "conv_last"],
        extra_channels=EXTRA_CHANNELS,
        norm="BN",
    ),
    head=L(SSDLiteHead)(
        input_shape=[ShapeSpec(channels=c) for c in [96, 1280] + EXTRA_CHANNELS],
        num_classes="${..num_classes}",
        num_anchors=6,
        norm="BN",
    ),
    head_in_features=None,  # every level of the neck, in order of stride
    anchor_generator=L(SSDAnchorGenerator)(
        min_sizes=[48, 100, 150, 202, 253, 304],
        max_sizes=[100, 150, 202, 253, 304, 320],
        aspect_ratios=[2.0, 3.0],
        strides=[16, 32, 64, 128, 256, 512],
        offset=0.5,
    ),
    box2box_transform=L(Box2BoxTransform)(weights=[10.0, 10.0, 5.0, 5.0]),
    anchor_matcher=L(Matcher)(thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=True),
    num_classes=80,
    neg_pos_ratio=3.0,
    smooth_l1_beta=1.0,
    test_score_thresh=0.02,
    test_nms_thresh=0.45,
    max_detections_per_image=200,
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    input_format="RGB",
)
