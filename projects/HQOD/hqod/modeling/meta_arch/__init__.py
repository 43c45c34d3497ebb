"""Dense detectors with the HQOD losses, and ATSS (not part of detectron2)."""
from .atss import ATSS, HQODATSS, ATSSHead, atss_match
from .fcos import FCOS, HQODFCOS
from .retinanet import HQODRetinaNet

__all__ = ["ATSS", "ATSSHead", "FCOS", "HQODATSS", "HQODFCOS", "HQODRetinaNet", "atss_match"]
