"""YOLOX-tiny (the HQOD authors' COCO setting, ../shared/notes/lightweight-detectors.md):
CSPDarknet (deepen 0.33, widen 0.375: Focus stem, SPP 5/9/13) -> stages 2-4 (96, 192, 384
channels, strides 8/16/32) -> PAFPN to 96 channels (1 CSP block, nearest upsampling) -> a decoupled
head per level (2 convs of 96 per branch, SiLU), SimOTA (centre radius 2.5, top-k 10, IoU cost 3,
class cost 1), BCE class and objectness losses, box loss 5 x (1 - IoU^2). One prior per location:
a square of the level's stride on the grid points (offset 0), decoded with unit weights."""
from detectron2.config import LazyCall as L
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform

from hqod.modeling import YOLOX, CSPDarknet, YOLOXHead, YOLOXPAFPN, level_shapes

STRIDES = [8, 16, 32]

model = L(YOLOX)(
    backbone=L(YOLOXPAFPN)(
        bottom_up=L(CSPDarknet)(deepen_factor=0.33, widen_factor=0.375, out_features=["stage2", "stage3", "stage4"], norm="BN"),
        in_features=["stage2", "stage3", "stage4"],
        out_channels=96,
        num_csp_blocks=1,
        norm="BN",
    ),
    head=L(YOLOXHead)(
        input_shape=L(level_shapes)(channels="${...backbone.out_channels}", num_levels=len(STRIDES)),
        num_classes="${..num_classes}",
        conv_dims="${..backbone.out_channels}",
        num_convs=2,
        prior_prob=0.01,
        norm="BN",
    ),
    head_in_features=["p3", "p4", "p5"],
    anchor_generator=L(DefaultAnchorGenerator)(sizes=[[s] for s in STRIDES], aspect_ratios=[1.0], strides=STRIDES, offset=0.0),
    box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
    num_classes=80,
    center_radius=2.5,
    candidate_topk=10,
    iou_cost_weight=3.0,
    cls_cost_weight=1.0,
    box_loss_weight=5.0,
    l1_loss_weight=0.0,
    test_score_thresh=0.01,
    test_nms_thresh=0.65,
    max_detections_per_image=100,
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    input_format="RGB",
)
