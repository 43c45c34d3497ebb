"""
What the three HQOD detectors share: the four switches and the computation of ``p`` and ``u``
for the positives of a dense detector (HQOD Eq. 5-9).
"""
from typing import Dict, List, Type

import torch
from torch import Tensor

from detectron2.layers import cat
from detectron2.structures import Boxes
from detectron2.utils.events import get_event_storage

from ...losses import aligned_box_iou, gt_class_scores, hqod_losses
from ...utils import all_subclasses

__all__ = ["HQODLossMixin", "hqod_args_from_cfg", "hqod_variant", "dense_detectors"]


def hqod_args_from_cfg(cfg) -> Dict:
    """
    HQOD switches from a yacs config, for the ``from_config`` of the HQOD detectors: keys
    ``MODEL.HQOD.{TCORR, HIOU, SIGMA, GAMMA}``, each optional (the constructor defaults apply).
    """
    node = cfg.MODEL.get("HQOD", None)
    if node is None:
        return {}
    keys = {"TCORR": "tcorr", "HIOU": "hiou", "SIGMA": "sigma", "GAMMA": "gamma"}
    return {arg: node[key] for key, arg in keys.items() if key in node}


class HQODLossMixin:
    """
    Mixin for a dense detector (``self.num_classes`` and ``self.box2box_transform`` set; sigmoid
    classification) that computes the HQOD terms of Eq. 9 from the same anchors, predictions and
    anchor labels as the detector's own losses.
    """

    def _init_hqod(self, *, tcorr: bool, hiou: bool, sigma: float, gamma: float):
        self.tcorr = bool(tcorr)
        self.hiou = bool(hiou)
        self.sigma = float(sigma)
        self.gamma = float(gamma)

    @property
    def hqod_enabled(self) -> bool:
        """Whether any HQOD term is added; if not, the losses are exactly the parent's."""
        return self.tcorr or self.hiou

    def hqod_loss_terms(
        self,
        anchors: List[Boxes],
        pred_logits: List[Tensor],
        pred_anchor_deltas: List[Tensor],
        gt_labels: Tensor,
        gt_boxes: Tensor,
        normalizer,
    ) -> Dict[str, Tensor]:
        """
        Args:
            anchors (list[Boxes]): #level anchors, R in total.
            pred_logits, pred_anchor_deltas (list[Tensor]): #level tensors of shape
                (N, Hi * Wi * A, K or 4), as given to the detector's ``losses``.
            gt_labels (Tensor): (N, R) anchor labels: -1 ignore, K background, else the class.
            gt_boxes (Tensor): (N, R, 4) matched ground-truth boxes (XYXY).
            normalizer (float): the detector's box-loss normalizer.

        Returns:
            dict[str, Tensor]: ``loss_tcorr`` and/or ``loss_hiou`` (see :func:`hqod_losses`).
        """
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)  # (N, R)
        # p: sigmoid score of the ground-truth class of each positive (not the max score).
        p = gt_class_scores(cat(pred_logits, dim=1)[pos_mask], gt_labels[pos_mask])
        # u: IoU of the decoded predicted box with its ground-truth box; not detached.
        anchors = type(anchors[0]).cat(anchors).tensor  # (R, 4)
        pos_anchors = anchors.unsqueeze(0).expand(len(gt_labels), -1, -1)[pos_mask]
        pred_boxes = self.box2box_transform.apply_deltas(
            cat(pred_anchor_deltas, dim=1)[pos_mask], pos_anchors
        )
        u = aligned_box_iou(pred_boxes, gt_boxes[pos_mask].to(pred_boxes.dtype))
        p = p.to(u.dtype)

        if p.numel() > 0:
            storage = get_event_storage()
            storage.put_scalar("hqod/pos_score", p.detach().mean().item())
            storage.put_scalar("hqod/pos_iou", u.detach().mean().item())
        return hqod_losses(
            p, u, normalizer, tcorr=self.tcorr, hiou=self.hiou, sigma=self.sigma, gamma=self.gamma
        )

    def extra_repr(self) -> str:
        return f"tcorr={self.tcorr}, hiou={self.hiou}, sigma={self.sigma}, gamma={self.gamma}"


def hqod_variant(detector_class: Type) -> Type:
    """The HQOD subclass of a dense detector class: the class defined as
    ``class HQODX(HQODLossMixin, detector_class)`` (the HQOD classes are the only list)."""
    for cls in all_subclasses(HQODLossMixin):
        if detector_class in cls.__bases__:
            return cls
    path = lambda c: f"{c.__module__}.{c.__name__}"  # noqa: E731
    known = sorted(path(b) for c in all_subclasses(HQODLossMixin) for b in c.__bases__ if b is not HQODLossMixin)
    raise ValueError(f"{path(detector_class)} has no HQOD variant; the detectors with one: {', '.join(known)}.")


def dense_detectors() -> List[str]:
    """Import paths of the dense detectors defined by detectron2 and hqod (what a config's
    ``model._target_`` can name), from the class hierarchy."""
    from detectron2.modeling.meta_arch.dense_detector import DenseDetector

    import hqod.modeling  # noqa: F401  (defines hqod's detectors)

    return sorted(f"{c.__module__}.{c.__name__}" for c in all_subclasses(DenseDetector) if c.__module__.startswith(("detectron2.", "hqod.")))


def stack_boxes(gt_boxes) -> Tensor:
    """Stack per-image matched boxes, given as tensors or as :class:`Boxes` (v0.6 FCOS)."""
    return torch.stack([b.tensor if isinstance(b, Boxes) else b for b in gt_boxes])
