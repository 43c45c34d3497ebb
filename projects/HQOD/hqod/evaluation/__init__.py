from .coco import COCOEvaluator
from .harmony import HarmonyEvaluator, harmony_metrics, match_detections

__all__ = ["COCOEvaluator", "HarmonyEvaluator", "harmony_metrics", "match_detections"]
