from .backbone import level_shapes, resnet_depth, resnet_stages
from .meta_arch import ATSS, FCOS, HQODATSS, HQODFCOS, ATSSHead, HQODRetinaNet, atss_match, dense_detectors, hqod_variant

__all__ = [
    "ATSS",
    "ATSSHead",
    "FCOS",
    "HQODATSS",
    "HQODFCOS",
    "HQODRetinaNet",
    "atss_match",
    "dense_detectors",
    "hqod_variant",
    "level_shapes",
    "resnet_depth",
    "resnet_stages",
]
