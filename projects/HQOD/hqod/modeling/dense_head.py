"""
The dense-head protocol: what quantization needs to know of a head that a dense detector shares
over its feature levels (multi-level BN, AQD Sec. 3.2.2; 8-bit predictors; the integer engine).

A head declares which predictor reads which tower::

    @dense_head(predictors={"cls_score": "cls_subnet", "bbox_pred": "bbox_subnet"})
    class MyHead(nn.Module):
        ...

The declaration states that the head's forward, given one feature map per level, returns for each
predictor (in the declared order) the list over levels of ``predictor(tower(feature))``, where a
tower is an ``nn.Sequential`` of convs, norms and activations and a predictor a conv. This is the
form of detectron2's ``RetinaNetHead`` and ``FCOSHead`` (declared below) and hqod's ``ATSSHead``.
From the declaration alone, :func:`hqod.quantization.quantize_model` builds the quantized head
(:class:`hqod.quantization.MultiLevelHead`): one BN per level in each tower, the level passed
explicitly, the predictors as the 8-bit "output layers" — no quantized subclass per head.

A head that shares nothing over levels (SSD's: one tower and one predictor per level, of the
level's width) declares ``shared=False``: each declared tower is then an ``nn.ModuleList`` of
``nn.Sequential`` and each predictor an ``nn.ModuleList`` of convs, indexed by level. Its BNs are
already one per level, so it is quantized layer by layer; the declaration still names its
predictors (the 8-bit output layers) and the towers they read.

A declaration is for that exact class: a subclass (e.g. one that adds a predictor) declares its
own. A dense detector's head that has norms and no declaration is an error in ``quantize_model``.
"""
from typing import Dict, List, Optional

from torch import nn

from detectron2.layers import CycleBatchNormList
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.modeling.meta_arch.fcos import FCOSHead
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

__all__ = ["DenseHeadSpec", "dense_head", "dense_head_spec", "check_dense_head", "detections_from_head_outputs", "head_norms"]


class DenseHeadSpec:
    """A head's declaration: ``predictors`` maps each predictor (child name) to the tower (child
    name) it reads, in the order of the head's outputs; ``shared``: whether towers and predictors
    are shared over levels (else one per level, in ``nn.ModuleList``)."""

    def __init__(self, predictors: Dict[str, str], shared: bool = True):
        if not predictors:
            raise ValueError("A dense head declares at least one predictor.")
        self.predictors = dict(predictors)
        self.shared = bool(shared)

    @property
    def towers(self) -> List[str]:
        """The towers, in order of first use."""
        return list(dict.fromkeys(self.predictors.values()))

    def predictor_layers(self, head: nn.Module) -> List[str]:
        """Names, within ``head``, of its predictor convs: the predictors, or for a per-level
        head ``<predictor>.<level>``."""
        if self.shared:
            return list(self.predictors)
        return [f"{p}.{level}" for p in self.predictors for level in range(len(getattr(head, p)))]

    def tower_of(self, head: nn.Module, predictor_layer: str) -> nn.Module:
        """The tower (an ``nn.Sequential``) that feeds the predictor conv named
        ``predictor_layer`` (one of :meth:`predictor_layers`)."""
        if self.shared:
            return getattr(head, self.predictors[predictor_layer])
        predictor, level = predictor_layer.split(".")
        return getattr(head, self.predictors[predictor])[int(level)]

    def __repr__(self):
        return f"DenseHeadSpec(predictors={self.predictors}" + ("" if self.shared else ", shared=False") + ")"


_DECLARED: Dict[type, DenseHeadSpec] = {}


def dense_head(*, predictors: Dict[str, str], shared: bool = True):
    """Class decorator (or ``dense_head(predictors=...)(HeadClass)`` for a class defined
    elsewhere) declaring a dense head; see the module docstring."""

    def declare(head_class: type) -> type:
        _DECLARED[head_class] = DenseHeadSpec(predictors, shared)
        return head_class

    return declare


def dense_head_spec(head_class: type) -> Optional[DenseHeadSpec]:
    """The declaration of exactly ``head_class``, or None."""
    return _DECLARED.get(head_class)


def head_norms(head: nn.Module) -> List[str]:
    """Names of the BN layers (shared over levels, or detectron2's per-level
    ``CycleBatchNormList``) inside ``head``."""
    norm_types = (nn.modules.batchnorm._BatchNorm, CycleBatchNormList)
    names = []
    for name, m in head.named_modules():
        if name and isinstance(m, norm_types) and not any(name.startswith(n + ".") for n in names):
            names.append(name)  # not the BNs inside a CycleBatchNormList
    return names


def check_dense_head(head: nn.Module, spec: DenseHeadSpec) -> None:
    """Raise a ValueError naming what is wrong if ``head`` does not have the declared form:
    every tower an ``nn.Sequential`` child (per-level head: an ``nn.ModuleList`` of them, one
    per predictor conv), every predictor a child, and no parameter outside them (the quantized
    head computes exactly ``predictor(tower(feature))``)."""
    name = type(head).__qualname__
    children = dict(head.named_children())
    for tower in spec.towers:
        child = children.get(tower)
        is_tower = isinstance(child, nn.Sequential) if spec.shared else (
            isinstance(child, nn.ModuleList) and all(isinstance(t, nn.Sequential) for t in child)
        )
        if not is_tower:
            kind = "an nn.Sequential" if spec.shared else "an nn.ModuleList of nn.Sequential (one per level)"
            raise ValueError(
                f"{name} declares the tower {tower!r}, which is not {kind} child of the head "
                f"(children: {sorted(children)})."
            )
    for pred in spec.predictors:
        if pred not in children:
            raise ValueError(f"{name} declares the predictor {pred!r}, which is not a child of the head (children: {sorted(children)}).")
        if spec.shared:
            continue
        if not isinstance(children[pred], nn.ModuleList):
            raise ValueError(f"{name} declares the per-level predictor {pred!r}, which is not an nn.ModuleList (one conv per level).")
        if len(children[pred]) != len(children[spec.predictors[pred]]):
            raise ValueError(
                f"{name}: the per-level predictor {pred!r} has {len(children[pred])} levels and its "
                f"tower {spec.predictors[pred]!r} {len(children[spec.predictors[pred]])}."
            )
    declared = set(spec.predictors) | set(spec.towers)
    extra = [n for n, child in children.items() if n not in declared and next(child.parameters(), None) is not None]
    extra += [n for n, _ in head.named_parameters(recurse=False)]
    if extra:
        raise ValueError(
            f"{name} has parameters outside its declared towers and predictors: {sorted(extra)}. "
            "The quantized head computes only predictor(tower(feature)); move them into a "
            "declared tower or predictor."
        )


dense_head(predictors={"cls_score": "cls_subnet", "bbox_pred": "bbox_subnet"})(RetinaNetHead)
dense_head(predictors={"cls_score": "cls_subnet", "bbox_pred": "bbox_subnet", "ctrness": "bbox_subnet"})(FCOSHead)


def detections_from_head_outputs(model: nn.Module, images, predictions: List[List], batched_inputs) -> List[dict]:
    """
    A dense detector's inference after its head — anchor decoding, NMS, resizing to each input's
    size — on head outputs computed elsewhere (the integer engine, ONNX Runtime): ``predictions``
    holds one list over levels per predictor, for the preprocessed ``images`` (an ``ImageList``).
    The anchors need only the feature maps' sizes, which the outputs have; the outputs are copied
    (detectron2's inference applies the sigmoid in place). Returns what the detector's forward
    returns in inference.
    """
    predictions = [[p.detach().float().clone() for p in per_level] for per_level in predictions]
    features = [p.new_empty((p.shape[0], 0) + tuple(p.shape[2:])) for p in predictions[0]]
    results = model.forward_inference(images, features, predictions)
    return [
        {"instances": detector_postprocess(r, inp.get("height", size[0]), inp.get("width", size[1]))}
        for r, inp, size in zip(results, batched_inputs, images.image_sizes)
    ]
