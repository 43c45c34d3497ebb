from .dense_head import DenseHeadSpec, dense_head, dense_head_spec
from .backbone import level_shapes, resnet_depth, resnet_stages
from .meta_arch import (
    ATSS, FCOS, HQODATSS, HQODFCOS, HQODSSD, HQODYOLOX, SSD, YOLOX, ATSSHead, HQODRetinaNet, SSDAnchorGenerator,
    SSDLiteHead, YOLOXHead, atss_match, dense_detectors, hard_negative_mask, hqod_variant, simota_assign,
)
from .cspdarknet import CSPDarknet, YOLOXPAFPN
from .mobilenet import InvertedResidual, MobileNetV2, SSDLiteNeck

__all__ = [
    "ATSS",
    "ATSSHead",
    "CSPDarknet",
    "DenseHeadSpec",
    "FCOS",
    "HQODATSS",
    "HQODFCOS",
    "HQODRetinaNet",
    "HQODSSD",
    "HQODYOLOX",
    "InvertedResidual",
    "MobileNetV2",
    "SSD",
    "SSDAnchorGenerator",
    "SSDLiteHead",
    "SSDLiteNeck",
    "YOLOX",
    "YOLOXHead",
    "YOLOXPAFPN",
    "hard_negative_mask",
    "atss_match",
    "dense_head",
    "dense_head_spec",
    "dense_detectors",
    "hqod_variant",
    "level_shapes",
    "resnet_depth",
    "resnet_stages",
    "simota_assign",
]
