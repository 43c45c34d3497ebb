from .dense_head import DenseHeadSpec, dense_head, dense_head_spec
from .backbone import level_shapes, resnet_depth, resnet_stages
from .meta_arch import ATSS, FCOS, HQODATSS, HQODFCOS, ATSSHead, HQODRetinaNet, atss_match, dense_detectors, hqod_variant

__all__ = [
    "ATSS",
    "ATSSHead",
    "DenseHeadSpec",
    "FCOS",
    "HQODATSS",
    "HQODFCOS",
    "HQODRetinaNet",
    "atss_match",
    "dense_head",
    "dense_head_spec",
    "dense_detectors",
    "hqod_variant",
    "level_shapes",
    "resnet_depth",
    "resnet_stages",
]
