"""
The HQOD losses for any dense detector (HQOD Eq. 5-9): one mixin on one hook, the HQOD variants
of the detectors, the list of dense detectors.
"""
from typing import Dict, List, Tuple, Type

import torch
from torch import Tensor

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.structures import Boxes
from detectron2.utils.events import get_event_storage

from ...losses import aligned_box_iou, gt_class_scores, hardet_losses, hqod_losses
from ...utils import all_subclasses

__all__ = ["HQODLossMixin", "HARMONY_LOSSES", "hqod_args_from_cfg", "hqod_variant", "dense_detectors"]

#: The harmony losses a detector's HQOD variant trains with (``harmony=``): HQOD's TCorr + HIoU
#: (Eq. 5-9), or HarDet* (HQOD's Table III baseline, :func:`hqod.losses.hardet_losses`).
HARMONY_LOSSES = ("hqod", "hardet")


def hqod_args_from_cfg(cfg) -> Dict:
    """
    HQOD switches from a yacs config, for the ``from_config`` of the HQOD detectors: keys
    ``MODEL.HQOD.{HARMONY, TCORR, HIOU, SIGMA, GAMMA}``, each optional (the constructor defaults
    apply).
    """
    node = cfg.MODEL.get("HQOD", None)
    if node is None:
        return {}
    keys = {"HARMONY": "harmony", "TCORR": "tcorr", "HIOU": "hiou", "SIGMA": "sigma", "GAMMA": "gamma"}
    return {arg: node[key] for key, arg in keys.items() if key in node}


class HQODLossMixin:
    """
    The HQOD losses (Eq. 9) for a dense detector: ``class HQODX(HQODLossMixin, X)`` is detector
    ``X`` trained with ``loss_tcorr`` (Eq. 5-7) and ``loss_hiou`` (Eq. 8, times sigma) added to
    its losses. With ``tcorr=False, hiou=False`` it is exactly ``X``.

    What ``X`` provides, for its positives, through one hook:

    * ``X.losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, ...)``, the
      signature of detectron2's dense detectors, with ``num_classes`` as the background label
      and ``box2box_transform`` decoding the deltas; :meth:`harmony_pairs` computes p and u from
      these arguments (p by :meth:`positive_scores`: sigmoid classification; a softmax detector's
      HQOD variant overrides it, as SSD's does);
    * its box-loss normalizer after ``losses`` has run (:meth:`harmony_normalizer`:
      ``loss_normalizer``, the EMA of the number of positives of RetinaNet and FCOS; a detector
      with another one overrides it). Eq. 9's 1/P.

    ``harmony="hardet"`` trains with HarDet* instead (HQOD's Table III baseline,
    :func:`hqod.losses.hardet_losses`), which re-weights the positives' own classification and
    box losses; ``X``'s HQOD variant then also provides them, per positive, through
    ``positive_losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)`` ->
    ``(l_cls, l_reg)`` in the order of :meth:`harmony_pairs` (RetinaNet does).

    The mixin takes ``harmony``, ``tcorr``, ``hiou``, ``sigma``, ``gamma`` and passes the other
    keyword arguments to ``X``; from a yacs config they are ``MODEL.HQOD.*``
    (:func:`hqod_args_from_cfg`).
    """

    @configurable
    def __init__(
        self, *, harmony: str = "hqod", tcorr: bool = True, hiou: bool = True, sigma: float = 1.5,
        gamma: float = 0.8, **kwargs,
    ):
        """
        Args:
            harmony (str): ``"hqod"`` (TCorr and HIoU, as switched below) or ``"hardet"``
                (HarDet*, logged as ``loss_hardet_cls`` and ``loss_hardet_reg``; ``tcorr`` and
                ``hiou`` do not apply).
            tcorr (bool): add the Task-Correlated loss (Eq. 7), logged as ``loss_tcorr``.
            hiou (bool): add the Harmonious IoU loss (Eq. 8), logged as ``loss_hiou``.
            sigma (float): weight of the HIoU loss (Eq. 9); HarDet's step 1 uses it too.
            gamma (float): exponent of the HIoU adaptive weight (Eq. 8); ditto.
            kwargs: arguments of the detector.
        """
        if harmony not in HARMONY_LOSSES:
            raise ValueError(f"model.harmony must be one of {list(HARMONY_LOSSES)}; got {harmony!r}.")
        if harmony == "hardet" and not hasattr(type(self), "positive_losses"):
            raise ValueError(
                f"{type(self).__name__} has no per-positive losses for HarDet* (positive_losses); "
                "HarDet* is built for RetinaNet (HQOD's Table III)."
            )
        super().__init__(**kwargs)
        self.harmony = harmony
        self.tcorr = bool(tcorr)
        self.hiou = bool(hiou)
        self.sigma = float(sigma)
        self.gamma = float(gamma)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret.update(hqod_args_from_cfg(cfg))
        return ret

    @property
    def hqod_enabled(self) -> bool:
        """Whether any harmony term is added; if not, the losses are exactly the parent's."""
        return self.harmony == "hardet" or self.tcorr or self.hiou

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, *args):
        """The detector's losses plus ``loss_tcorr`` and ``loss_hiou`` for the enabled switches
        (or HarDet*'s ``loss_hardet_cls`` and ``loss_hardet_reg``)."""
        losses = super().losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, *args)
        if not self.hqod_enabled:
            return losses
        p, u = self.harmony_pairs(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)
        if p.numel() > 0:
            storage = get_event_storage()
            storage.put_scalar("hqod/pos_score", p.detach().mean().item())
            storage.put_scalar("hqod/pos_iou", u.detach().mean().item())
        if self.harmony == "hardet":
            l_cls, l_reg, scores = self.positive_losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)
            losses.update(hardet_losses(
                l_cls, l_reg, p, u, scores, self.harmony_normalizer(), sigma=self.sigma, gamma=self.gamma
            ))
            return losses
        losses.update(
            hqod_losses(p, u, self.harmony_normalizer(), tcorr=self.tcorr, hiou=self.hiou, sigma=self.sigma, gamma=self.gamma)
        )
        return losses

    def harmony_normalizer(self) -> float:
        """The detector's box-loss normalizer, as set by its ``losses`` just before."""
        return self.loss_normalizer

    def positive_scores(self, logits: Tensor, gt_classes: Tensor) -> Tensor:
        """p of the (P, K) logits of P positives and their (P,) classes: the sigmoid score of the
        ground-truth class."""
        return gt_class_scores(logits, gt_classes)

    def harmony_pairs(
        self,
        anchors: List[Boxes],
        pred_logits: List[Tensor],
        gt_labels: List[Tensor],
        pred_anchor_deltas: List[Tensor],
        gt_boxes: List,
    ) -> Tuple[Tensor, Tensor]:
        """
        Args:
            anchors (list[Boxes]): #level anchors, R in total.
            pred_logits, pred_anchor_deltas (list[Tensor]): #level tensors of shape
                (N, Hi * Wi * A, K or 4), as given to the detector's ``losses``.
            gt_labels (list[Tensor]): #image (R,) anchor labels: -1 ignore, K background, else
                the class.
            gt_boxes (list[Tensor or Boxes]): #image (R, 4) matched ground-truth boxes (XYXY).

        Returns:
            p, u (Tensor): (P,) for the P positives: p the score of the ground-truth class
            (:meth:`positive_scores`; not the max score), u the IoU of the decoded predicted box with its
            ground-truth box; neither is detached.
        """
        gt_labels = torch.stack(gt_labels)  # (N, R)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        p = self.positive_scores(cat(pred_logits, dim=1)[pos_mask], gt_labels[pos_mask])
        anchors = type(anchors[0]).cat(anchors).tensor  # (R, 4)
        pos_anchors = anchors.unsqueeze(0).expand(len(gt_labels), -1, -1)[pos_mask]
        pred_boxes = self.box2box_transform.apply_deltas(cat(pred_anchor_deltas, dim=1)[pos_mask], pos_anchors)
        u = aligned_box_iou(pred_boxes, stack_boxes(gt_boxes)[pos_mask].to(pred_boxes.dtype))
        return p.to(u.dtype), u

    def extra_repr(self) -> str:
        switches = "" if self.harmony == "hardet" else f", tcorr={self.tcorr}, hiou={self.hiou}"
        return f"harmony={self.harmony}{switches}, sigma={self.sigma}, gamma={self.gamma}"


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
