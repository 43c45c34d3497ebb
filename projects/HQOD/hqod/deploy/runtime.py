"""
Running an exported detector in ONNX Runtime with detectron2's pre- and post-processing
(:class:`OnnxDetector`), and how closely it reproduces the PyTorch model
(:func:`compare_onnx_model`).
"""
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from hqod.modeling.dense_head import detections_from_head_outputs
from hqod.quantization.integer_check import fake_quant_reference, match_detections

from .export import output_names, prepare_for_export
from .qdq import QDQConv2d

__all__ = [
    "OnnxDetector", "OnnxAgreement", "compare_onnx_model", "session_options", "executed_kernels", "conv_kernel_counts",
    "INTEGER_CONVS", "FLOAT_CONVS",
]


def session_options(threads: Optional[int] = None, optimized_model: str = ""):
    """ONNX Runtime session options: all graph optimizations (the Q/DQ fusion into integer
    kernels), ``threads`` intra-op threads (None: ONNX Runtime's default), the optimized graph
    written to ``optimized_model`` when given."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_model:
        options.optimized_model_filepath = optimized_model
    return options


#: How ONNX Runtime runs a convolution: on integers, or in float (its CPU layouts included).
INTEGER_CONVS = ("QLinearConv", "ConvInteger")
FLOAT_CONVS = ("Conv", "FusedConv", "NchwcConv")


def executed_kernels(optimized_model: str) -> Dict[str, int]:
    """Op types of an optimized ONNX Runtime graph (``session_options(optimized_model=...)``)
    and their counts: which convolutions run as integer kernels (:data:`INTEGER_CONVS`) and
    which in float (:data:`FLOAT_CONVS`)."""
    import onnx

    return dict(sorted(Counter(node.op_type for node in onnx.load(optimized_model).graph.node).items()))


def conv_kernel_counts(kernels: Dict[str, int]) -> Tuple[int, int]:
    """``(integer, float)`` convolutions among :func:`executed_kernels`'s counts."""
    return sum(kernels.get(k, 0) for k in INTEGER_CONVS), sum(kernels.get(k, 0) for k in FLOAT_CONVS)


class OnnxDetector(nn.Module):
    """
    A detector whose network (backbone + FPN + head) runs in ONNX Runtime: ``forward`` takes
    and returns what the detectron2 model does in inference (a list of dicts in, a list of
    ``{"instances": ...}`` out), so that detectron2's evaluators (COCOEvaluator,
    HarmonyEvaluator) and ``inference_on_dataset`` use it unchanged. ``model`` (the detector the
    file was exported from) does the preprocessing (normalization, padding), anchor decoding,
    NMS and the resizing to the input's size; its network weights are not used.
    """

    def __init__(self, model: nn.Module, onnx_path: str, *, threads: Optional[int] = None, optimized_model: str = ""):
        import onnxruntime as ort

        super().__init__()
        self.model = model.cpu().eval()
        self.session = ort.InferenceSession(
            onnx_path, session_options(threads, optimized_model), providers=["CPUExecutionProvider"]
        )
        self.output_names = output_names(model)
        found = [o.name for o in self.session.get_outputs()]
        if found != self.output_names:
            raise ValueError(f"{onnx_path} has outputs {found}; this detector's head gives {self.output_names}.")
        self.num_levels = len(model.head_in_features)

    def predictions(self, images: torch.Tensor) -> List[List[torch.Tensor]]:
        """The head's outputs on the preprocessed ``images``: one list over levels per predictor."""
        outputs = self.session.run(self.output_names, {"images": images.detach().cpu().numpy()})
        outputs = [torch.from_numpy(o) for o in outputs]
        return [outputs[i: i + self.num_levels] for i in range(0, len(outputs), self.num_levels)]

    @torch.no_grad()
    def forward(self, batched_inputs):
        images = self.model.preprocess_image(batched_inputs)
        return detections_from_head_outputs(self.model, images, self.predictions(images.tensor), batched_inputs)


def output_steps(model: nn.Module) -> Dict[str, List[Optional[torch.Tensor]]]:
    """Per predictor and level, the step of one unit of its int32 output (``alpha_x * alpha_w``
    per channel, (1, C, 1, 1)) for a quantized predictor, None for an FP32 one."""
    exported = prepare_for_export(model)
    num_levels = len(model.head_in_features)
    steps = {}
    for name in dict.fromkeys(n.rpartition(".")[0] for n in output_names(model)):
        layer = getattr(exported.head, name)
        per_level = list(layer) if isinstance(layer, nn.ModuleList) else [layer] * num_levels  # per-level head (SSD)
        steps[name] = [m.bias_scale[0].double().view(1, -1, 1, 1) if isinstance(m, QDQConv2d) else None for m in per_level]
    return steps


@dataclass
class OnnxAgreement:
    """What :func:`compare_onnx_model` measured. Head-output differences are in output steps
    for quantized predictors (in absolute value for FP32 ones: ``max_abs_diff``)."""

    num_images: int = 0
    num_outputs: int = 0
    max_step_diff: float = 0.0
    beyond_one_step: int = 0
    max_abs_diff: float = 0.0
    per_output_max: Dict[str, float] = field(default_factory=dict)
    detections_torch: int = 0
    detections_onnx: int = 0
    detections_matched: int = 0
    ap_torch: Optional[float] = None
    ap_onnx: Optional[float] = None
    # the PyTorch model computing in float64 (``reference64``): the same function with exact
    # rounding; ONNX Runtime's integer kernels can be closer to it than float32 PyTorch is
    ap_torch64: Optional[float] = None
    beyond_one_step64: Optional[int] = None  # ONNX Runtime vs the float64 model
    detections_torch64: Optional[int] = None
    detections_matched64: Optional[int] = None
    seconds_torch: float = 0.0
    seconds_onnx: float = 0.0

    @staticmethod
    def _rate(matched: int, reference: int, onnx: int) -> float:
        denom = max(reference, onnx)
        return 1.0 if denom == 0 else matched / denom

    @property
    def match_rate(self) -> float:
        return self._rate(self.detections_matched, self.detections_torch, self.detections_onnx)

    @property
    def match_rate64(self) -> Optional[float]:
        if self.detections_matched64 is None:
            return None
        return self._rate(self.detections_matched64, self.detections_torch64, self.detections_onnx)

    @property
    def ap_diff(self) -> Optional[float]:
        if self.ap_torch is None or self.ap_onnx is None:
            return None
        return abs(self.ap_onnx - self.ap_torch)

    @property
    def ap_diff64(self) -> Optional[float]:
        if self.ap_torch64 is None or self.ap_onnx is None:
            return None
        return abs(self.ap_onnx - self.ap_torch64)

    def to_dict(self):
        return dict(
            asdict(self), match_rate=self.match_rate, match_rate64=self.match_rate64, ap_diff=self.ap_diff,
            ap_diff64=self.ap_diff64,
        )

    def format(self) -> str:
        per = ", ".join(f"{k} {v:.3g}" for k, v in self.per_output_max.items())
        lines = [
            f"ONNX Runtime vs PyTorch on {self.num_images} images:",
            f"  head outputs: max |diff| {self.max_step_diff:.4g} output steps ({per}); "
            f"{self.beyond_one_step} of {self.num_outputs} values beyond +-1 step; max |diff| {self.max_abs_diff:.4g}",
            f"  detections after NMS: {self.detections_matched} matched of {self.detections_torch} (PyTorch) / "
            f"{self.detections_onnx} (ONNX Runtime): match rate {100 * self.match_rate:.2f}%",
        ]
        if self.beyond_one_step64 is not None:
            lines.append(
                f"  vs PyTorch in float64 (the same function, exact rounding): {self.beyond_one_step64} of "
                f"{self.num_outputs} values beyond +-1 step; detections {self.detections_matched64} matched of "
                f"{self.detections_torch64}: match rate {100 * self.match_rate64:.2f}%"
            )
        if self.ap_diff is not None:
            ref = (
                "" if self.ap_diff64 is None else f"; PyTorch in float64 {self.ap_torch64:.3f}, |diff| {self.ap_diff64:.3f}"
            )
            lines.append(
                f"  COCO AP: PyTorch {self.ap_torch:.3f}, ONNX Runtime {self.ap_onnx:.3f}; |diff| {self.ap_diff:.3f}{ref}"
            )
        n = max(self.num_images, 1)
        lines.append(
            f"  time per image: PyTorch {1000 * self.seconds_torch / n:.1f} ms, ONNX Runtime "
            f"{1000 * self.seconds_onnx / n:.1f} ms"
        )
        return "\n".join(lines)


@torch.no_grad()
def compare_onnx_model(
    model: nn.Module,
    detector: OnnxDetector,
    data_loader: Iterable,
    *,
    num_images: Optional[int] = None,
    dataset_name: Optional[str] = None,
    reference64: bool = False,
    match_iou: float = 0.95,
    score_tol: float = 0.01,
) -> OnnxAgreement:
    """
    Run the PyTorch ``model`` (fake-quant or FP32, as it runs) and the ONNX Runtime
    ``detector`` on the images of ``data_loader`` (detectron2 test-loader batches): head
    outputs in output steps (the largest difference, the values beyond one step), detections
    after NMS matched one to one (same class, IoU >= ``match_iou``, scores within
    ``score_tol``), and with ``dataset_name`` the COCO AP of both. With ``reference64`` the
    same comparison (values beyond one step, detections, AP) with the PyTorch model computing in
    float64 (:func:`~hqod.quantization.fake_quant_reference`): a low-bit model is so sensitive
    to rounding that float32 vs float64 alone moves its outputs, and an export whose int32
    biases are the trained ones (``quant.integer_bias``, scope ``aqd``) can match the float64
    model where float32 PyTorch does not.
    """
    from hqod.evaluation import COCOEvaluator

    model = model.cpu().eval()
    steps = output_steps(model)
    ref64 = fake_quant_reference(model) if reference64 else None
    evaluators = {}
    if dataset_name is not None:
        for key in ("torch", "onnx") + (("torch64",) if ref64 is not None else ()):
            evaluators[key] = COCOEvaluator(dataset_name, output_dir=None, distributed=False)
            evaluators[key].reset()
    report = OnnxAgreement(per_output_max={n: 0.0 for n in steps})
    if ref64 is not None:
        report.beyond_one_step64 = report.detections_torch64 = report.detections_matched64 = 0
    img_ids = []
    for batch in data_loader:
        if num_images is not None and report.num_images >= num_images:
            break
        if num_images is not None:
            batch = batch[: num_images - report.num_images]
        images = model.preprocess_image(batch)
        t0 = time.perf_counter()
        features = model.backbone(images.tensor)
        torch_preds = model.head([features[f] for f in model.head_in_features])
        t1 = time.perf_counter()
        onnx_preds = detector.predictions(images.tensor)
        t2 = time.perf_counter()
        report.seconds_torch += t1 - t0
        report.seconds_onnx += t2 - t1
        for name, per_level_torch, per_level_onnx in zip(steps, torch_preds, onnx_preds):
            for r, o, step in zip(per_level_torch, per_level_onnx, steps[name]):
                diff = (r.double() - o.double()).abs()
                report.num_outputs += diff.numel()
                if not diff.numel():
                    continue
                report.max_abs_diff = max(report.max_abs_diff, float(diff.max()))
                if step is not None:
                    diff = diff / step
                    report.beyond_one_step += int((diff > 1.0).sum())
                m = float(diff.max())
                report.per_output_max[name] = max(report.per_output_max[name], m)
                report.max_step_diff = max(report.max_step_diff, m if step is not None else 0.0)
        torch_out = detections_from_head_outputs(model, images, torch_preds, batch)
        onnx_out = detections_from_head_outputs(model, images, onnx_preds, batch)
        for a, b in zip(torch_out, onnx_out):
            report.detections_torch += len(a["instances"])
            report.detections_onnx += len(b["instances"])
            report.detections_matched += match_detections(a["instances"], b["instances"], iou=match_iou, score_tol=score_tol)
        if evaluators:
            evaluators["torch"].process(batch, torch_out)
            evaluators["onnx"].process(batch, onnx_out)
        if ref64 is not None:
            features64 = ref64.backbone(images.tensor.double())
            preds64 = ref64.head([features64[f] for f in ref64.head_in_features])
            for name, per_level64, per_level_onnx in zip(steps, preds64, onnx_preds):
                for r, o, step in zip(per_level64, per_level_onnx, steps[name]):
                    if step is not None:
                        report.beyond_one_step64 += int(((r - o.double()).abs() / step > 1.0).sum())
            out64 = detections_from_head_outputs(
                ref64, images, [[p.float() for p in per_level] for per_level in preds64], batch
            )
            for a, b in zip(out64, onnx_out):
                report.detections_torch64 += len(a["instances"])
                report.detections_matched64 += match_detections(
                    a["instances"], b["instances"], iou=match_iou, score_tol=score_tol
                )
            if evaluators:
                evaluators["torch64"].process(batch, out64)
        img_ids += [b["image_id"] for b in batch if "image_id" in b]
        report.num_images += len(batch)
    if evaluators:
        ids = img_ids or None
        report.ap_torch = evaluators["torch"].box_ap(ids)
        report.ap_onnx = evaluators["onnx"].box_ap(ids)
        if ref64 is not None:
            report.ap_torch64 = evaluators["torch64"].box_ap(ids)
    return report
