"""Dense detectors with the HQOD losses, and ATSS (not part of detectron2)."""
from .atss import ATSS, HQODATSS, ATSSHead, atss_match
from .fcos import FCOS, HQODFCOS
from .hqod_mixin import dense_detectors, hqod_variant
from .retinanet import HQODRetinaNet

__all__ = ["ATSS", "ATSSHead", "FCOS", "HQODATSS", "HQODFCOS", "HQODRetinaNet", "atss_match", "dense_detectors", "hqod_variant"]
