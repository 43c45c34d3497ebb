import contextlib
import io

from detectron2.evaluation import COCOEvaluator as _D2COCOEvaluator

from hqod.compat import HAS_D2_CPP_OPS


class COCOEvaluator(_D2COCOEvaluator):
    """
    detectron2's COCOEvaluator for boxes, using its fast C++ COCOeval when detectron2's real ``_C``
    is installed and pycocotools otherwise (same numbers, slower). Prints AP, AP50, AP75, APs,
    APm, APl (and per-class AP).
    """

    def __init__(self, dataset_name, output_dir=None, *, tasks=("bbox",), distributed=True, **kwargs):
        kwargs.setdefault("use_fast_impl", HAS_D2_CPP_OPS)
        super().__init__(
            dataset_name, tasks=tasks, distributed=distributed, output_dir=output_dir, **kwargs
        )

    def box_ap(self, img_ids=None) -> float:
        """The box AP of what was processed (on ``img_ids`` only, if given), without
        pycocotools' printed tables; NaN when there is nothing to evaluate."""
        with contextlib.redirect_stdout(io.StringIO()):
            results = self.evaluate(img_ids=img_ids) or {}
        return float(results.get("bbox", {}).get("AP", float("nan")))
