"""Dense detectors with the HQOD losses, and ATSS (not part of detectron2)."""
from .atss import ATSS, HQODATSS, ATSSHead, atss_match
from .fcos import FCOS, HQODFCOS
from .hqod_mixin import dense_detectors, hqod_variant
from .retinanet import HQODRetinaNet
from .ssd import HQODSSD, SSD, SSDAnchorGenerator, SSDLiteHead, hard_negative_mask
from .yolox import HQODYOLOX, YOLOX, YOLOXHead, simota_assign

__all__ = [
    "ATSS", "ATSSHead", "FCOS", "HQODATSS", "HQODFCOS", "HQODRetinaNet", "HQODSSD", "SSD", "SSDAnchorGenerator",
    "SSDLiteHead", "HQODYOLOX", "YOLOX", "YOLOXHead", "atss_match", "dense_detectors", "hard_negative_mask",
    "hqod_variant", "simota_assign",
]
