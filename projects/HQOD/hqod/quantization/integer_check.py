"""
How closely the integer-only engine (:func:`~.integer.to_integer`) reproduces the fake-quant
model it was converted from, on real images: :func:`compare_integer_model`.

Three measures, as the integer engine issue asks:

* head outputs (classification logits, box deltas, centerness) in units of each predictor's
  output step ``alpha_conv`` (one unit of its int32 output): the largest difference and how
  many values differ by more than one step;
* detections after NMS: the fraction matched one to one (same class, IoU >= ``match_iou``,
  scores within ``score_tol``);
* COCO AP of both (detectron2's COCOEvaluator on the same images) and its difference;

plus the time per image of both models on this machine.

Two fake-quant references. The model as it runs (float32) rounds differently from exact
arithmetic, so an activation that lies within float32 noise of a rounding boundary can land on
the neighbouring integer, and that difference propagates. :func:`fake_quant_reference` gives the
same fake-quant model computing in float64 (its float32 integer weights frozen in, so that both
use the same weight levels): the arithmetic the engine implements, with float64 rounding. The
report gives the agreement with both.
"""
import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from detectron2.structures import Instances, pairwise_iou

from hqod.modeling.dense_head import detections_from_head_outputs

from .integer import IntegerHead, IntegerPerLevelHead, integer_summary
from .integer.network import scale_outputs
from .modules import QConv2d, QLinear

__all__ = ["AgreementReport", "compare_integer_model", "fake_quant_reference", "match_detections"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def fake_quant_reference(model: nn.Module, dtype=torch.float64) -> nn.Module:
    """
    A copy of the fake-quant ``model`` that computes in ``dtype``, with each quantized layer's
    weight replaced by its fake-quantized value in the original precision (which the weight
    quantizer maps back onto the same level in any precision): the same integer weights, the
    same BN shifts, biases and add alignments, rounding at float64 precision.
    """
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, (QConv2d, QLinear)):
            m.weight.copy_(m.weight_quant(m.weight))
    return ref.to(dtype).eval()


def match_detections(a: Instances, b: Instances, *, iou: float = 0.95, score_tol: float = 0.01) -> int:
    """Number of one-to-one matches between two images' detections: same class, box IoU >=
    ``iou``, scores within ``score_tol`` (greedy, highest scores of ``a`` first)."""
    if len(a) == 0 or len(b) == 0:
        return 0
    ious = pairwise_iou(a.pred_boxes, b.pred_boxes)
    ok = (ious >= iou) & (a.pred_classes[:, None] == b.pred_classes[None, :])
    ok &= (a.scores[:, None] - b.scores[None, :]).abs() <= score_tol
    used = torch.zeros(len(b), dtype=torch.bool)
    matched = 0
    for i in torch.argsort(a.scores, descending=True).tolist():
        cand = ok[i] & ~used
        if cand.any():
            j = int(torch.argmax(torch.where(cand, ious[i], torch.full_like(ious[i], -1.0))))
            used[j] = True
            matched += 1
    return matched


@dataclass
class _Agreement:
    """Head-output agreement with one reference, in output steps."""

    max_step_diff: float = 0.0
    beyond_one_step: int = 0
    # beyond 1 step plus 2 ulps of the reference value: what float32 cannot resolve excluded
    beyond_one_step_and_float: int = 0
    max_ulp_steps: float = 0.0  # the reference format's resolution at the outputs, in steps
    detections_ref: int = 0
    detections_matched: int = 0
    per_output_max: Dict[str, float] = field(default_factory=dict)


@dataclass
class AgreementReport:
    """What :func:`compare_integer_model` measured. Step differences are in units of each
    predictor's output step; ``match_rate`` = matched / max(#fake-quant, #integer) detections."""

    num_images: int
    num_outputs: int
    output_steps: Dict[str, List[Union[float, List[float]]]]  # per level; a list: one step per channel
    detections_integer: int
    float32: _Agreement
    float64: Optional[_Agreement]
    ap_fake_quant: Optional[float]
    ap_integer: Optional[float]
    ap_reference64: Optional[float]
    seconds_fake_quant: float
    seconds_integer: float
    summary: Dict[str, object]

    @staticmethod
    def _rate(agreement: _Agreement, n_int: int) -> float:
        denom = max(agreement.detections_ref, n_int)
        return 1.0 if denom == 0 else agreement.detections_matched / denom

    @property
    def match_rate(self) -> float:
        return self._rate(self.float32, self.detections_integer)

    @property
    def match_rate_ref64(self) -> Optional[float]:
        return None if self.float64 is None else self._rate(self.float64, self.detections_integer)

    @property
    def ap_diff(self) -> Optional[float]:
        if self.ap_fake_quant is None or self.ap_integer is None:
            return None
        if math.isnan(self.ap_fake_quant) and math.isnan(self.ap_integer):
            return 0.0
        return abs(self.ap_integer - self.ap_fake_quant)

    @property
    def speed_ratio(self) -> float:
        """Integer engine time / fake-quant time (> 1: the engine is slower)."""
        return self.seconds_integer / max(self.seconds_fake_quant, 1e-12)

    def to_dict(self) -> Dict[str, object]:
        out = {
            k: getattr(self, k)
            for k in ("num_images", "num_outputs", "output_steps", "detections_integer", "ap_fake_quant",
                      "ap_integer", "ap_reference64", "ap_diff", "seconds_fake_quant", "seconds_integer",
                      "speed_ratio", "match_rate", "match_rate_ref64")
        }
        out["float32"] = dict(self.float32.__dict__)
        out["float64"] = None if self.float64 is None else dict(self.float64.__dict__)
        out["summary"] = dict(self.summary)
        return out

    def format(self) -> str:
        def agree(name, a: _Agreement):
            rate = self._rate(a, self.detections_integer)
            per = ", ".join(f"{k} {v:.3g}" for k, v in a.per_output_max.items())
            return [
                f"  vs fake-quant {name}:",
                f"    head outputs: max |diff| {a.max_step_diff:.4g} steps ({per}); "
                f"{a.beyond_one_step} of {self.num_outputs} values beyond +-1 step, "
                f"{a.beyond_one_step_and_float} beyond +-(1 step + 2 ulps) (the format's resolution "
                f"there: up to {a.max_ulp_steps:.3g} steps per ulp)",
                f"    detections after NMS: {a.detections_matched} matched of {a.detections_ref} "
                f"(fake-quant) / {self.detections_integer} (integer): match rate {100 * rate:.2f}%",
            ]

        steps = ", ".join(_steps_text(k, per_level) for k, per_level in self.output_steps.items())
        lines = [f"Integer-only engine vs fake-quant model on {self.num_images} images "
                 f"(output steps: {steps})"]
        lines += agree("float32 (as run)", self.float32)
        if self.float64 is not None:
            lines += agree("float64 (same integers, exact rounding)", self.float64)
        if self.ap_fake_quant is not None:
            ref = f", fake-quant float64 {self.ap_reference64:.3f}" if self.ap_reference64 is not None else ""
            lines.append(
                f"  COCO AP: fake-quant {self.ap_fake_quant:.3f}, integer {self.ap_integer:.3f}{ref}; "
                f"|diff| {self.ap_diff:.3f}"
            )
        lines.append(
            f"  time per image: fake-quant {1000 * self.seconds_fake_quant / max(self.num_images, 1):.1f} ms, "
            f"integer {1000 * self.seconds_integer / max(self.num_images, 1):.1f} ms "
            f"(integer / fake-quant = {self.speed_ratio:.2f}x)"
        )
        s = self.summary
        lines.append(
            f"  integer model: {s['conv_units']} conv units ({s['float32_convs']} computed in float32, "
            f"{s['float64_convs']} in float64, all exact); {s['int32']}"
        )
        return "\n".join(lines)


def _steps_text(name: str, per_level: List[Union[float, List[float]]]) -> str:
    """An output's steps over its levels (and channels), as the report prints them."""
    values = [x for v in per_level for x in (v if isinstance(v, list) else [v])]
    if len(set(values)) == 1:
        return f"{name} {values[0]:.4g}"
    return f"{name} {min(values):.4g}..{max(values):.4g} per {'channel' if isinstance(per_level[0], list) else 'level'}"


def _ulp(r: torch.Tensor) -> torch.Tensor:
    """The spacing of ``r``'s floating-point format at each value (float64 result)."""
    mantissa_bits = {torch.float32: 24, torch.float64: 53, torch.float16: 11, torch.bfloat16: 8}[r.dtype]
    _, exp = torch.frexp(r.detach().abs().double())
    return torch.ldexp(torch.ones_like(exp, dtype=torch.float64), exp - mantissa_bits)


def _features_and_head(model, x):
    features = model.backbone(x)
    return [features[f] for f in model.head_in_features]


def _coco_ap(evaluator, img_ids) -> Optional[float]:
    return None if evaluator is None else evaluator.box_ap(img_ids)


@torch.no_grad()
def compare_integer_model(
    fq_model: nn.Module,
    int_model: nn.Module,
    data_loader: Iterable,
    *,
    num_images: Optional[int] = None,
    reference64: bool = True,
    dataset_name: Optional[str] = None,
    match_iou: float = 0.95,
    score_tol: float = 0.01,
) -> AgreementReport:
    """
    Run the fake-quant model (float32, as it runs), the integer model and, with
    ``reference64``, :func:`fake_quant_reference` on the images of ``data_loader`` (detectron2
    test-loader batches), and measure their agreement (see the module docstring). With
    ``dataset_name`` both (all three) are evaluated with COCO AP on those images.
    """
    from hqod.evaluation import COCOEvaluator

    head = int_model.head
    if not isinstance(head, (IntegerHead, IntegerPerLevelHead)):
        raise TypeError("compare_integer_model: int_model must come from to_integer().")
    fq_model.eval()
    int_model.eval()
    ref_model = fake_quant_reference(fq_model) if reference64 else None
    names = head.output_names
    # output steps per output and level: a float, or (1, C, 1, 1) with per-channel weights
    steps = {n: [s.view(1, -1, 1, 1) if isinstance(s, torch.Tensor) else s for s in per_level] for n, per_level in zip(names, head.output_scales)}
    evaluators = {}
    if dataset_name is not None:
        for key in ("fq", "int") + (("ref",) if reference64 else ()):
            evaluators[key] = COCOEvaluator(dataset_name, output_dir=None, distributed=False)
            evaluators[key].reset()
    a32 = _Agreement(per_output_max={n: 0.0 for n in names})
    a64 = _Agreement(per_output_max={n: 0.0 for n in names}) if reference64 else None
    n_images = n_values = n_int_dets = 0
    t_fq = t_int = 0.0
    img_ids = []
    for batch in data_loader:
        if num_images is not None and n_images >= num_images:
            break
        if num_images is not None:
            batch = batch[: num_images - n_images]
        # fake-quant model, as it runs
        t0 = time.perf_counter()
        images = fq_model.preprocess_image(batch)
        feats = _features_and_head(fq_model, images.tensor)
        fq_preds = fq_model.head(feats)
        fq_out = detections_from_head_outputs(fq_model, images, fq_preds, batch)
        t1 = time.perf_counter()
        # integer model (same normalized image)
        int_images = int_model.preprocess_image(batch)
        int_feats = _features_and_head(int_model, int_images.tensor)
        int_q = head.forward_integer(int_feats)
        int_preds = scale_outputs(int_q, head.output_scales)
        int_out = detections_from_head_outputs(int_model, int_images, int_preds, batch)
        t2 = time.perf_counter()
        t_fq += t1 - t0
        t_int += t2 - t1
        refs = [("fq", a32, fq_preds, fq_out)]
        if ref_model is not None:
            ref_feats = _features_and_head(ref_model, images.tensor.double())
            ref_preds = ref_model.head(ref_feats)
            refs.append(("ref", a64, ref_preds, detections_from_head_outputs(ref_model, images, ref_preds, batch)))
        for key, agreement, preds, outs in refs:
            for name, per_level_ref, per_level_int in zip(names, preds, int_q):
                for r, q, step in zip(per_level_ref, per_level_int, steps[name]):
                    r = r.detach().cpu()  # in its own dtype (the ulp below is that format's)
                    diff = (r.double() / step - q.cpu().double()).abs()
                    if diff.numel():
                        m = float(diff.max())
                        agreement.per_output_max[name] = max(agreement.per_output_max[name], m)
                        agreement.max_step_diff = max(agreement.max_step_diff, m)
                        agreement.beyond_one_step += int((diff > 1.0).sum())
                        ulp = _ulp(r) / step
                        agreement.max_ulp_steps = max(agreement.max_ulp_steps, float(ulp.max()))
                        agreement.beyond_one_step_and_float += int((diff > 1.0 + 2 * ulp).sum())
            for o_ref, o_int in zip(outs, int_out):
                agreement.detections_ref += len(o_ref["instances"])
                agreement.detections_matched += match_detections(
                    o_ref["instances"].to("cpu"), o_int["instances"].to("cpu"), iou=match_iou, score_tol=score_tol
                )
            if key in evaluators:
                evaluators[key].process(batch, outs)
        if "int" in evaluators:
            evaluators["int"].process(batch, int_out)
        n_values += sum(q.numel() for per_level in int_q for q in per_level)
        n_int_dets += sum(len(o["instances"]) for o in int_out)
        img_ids += [b["image_id"] for b in batch if "image_id" in b]
        n_images += len(batch)
    ids = img_ids or None
    return AgreementReport(
        num_images=n_images,
        num_outputs=n_values,
        output_steps={n: [s.flatten().tolist() if isinstance(s, torch.Tensor) else s for s in per_level] for n, per_level in steps.items()},
        detections_integer=n_int_dets,
        float32=a32,
        float64=a64,
        ap_fake_quant=_coco_ap(evaluators.get("fq"), ids),
        ap_integer=_coco_ap(evaluators.get("int"), ids),
        ap_reference64=_coco_ap(evaluators.get("ref"), ids),
        seconds_fake_quant=t_fq,
        seconds_integer=t_int,
        summary=integer_summary(int_model),
    )
