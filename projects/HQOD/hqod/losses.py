"""
The two HQOD losses (Harmonious Quantization for Object Detection, Eq. 5-9), the HarDet*
baseline of HQOD's Table III, and the helpers the detectors use to feed them.

Notation of the paper, for the i-th positive sample (anchor or point assigned to a ground truth):

* ``p``: predicted classification score **of the ground-truth class** (a sigmoid probability for
  RetinaNet / FCOS / ATSS); not the maximum score over classes.
* ``u``: IoU between the **decoded predicted box** and its matched ground-truth box.

Gradient semantics follow the authors' code: ``p`` and ``u`` are NOT detached, and neither are the
dynamic exponents ``beta_cls = u`` and ``beta_reg = p`` (the authors report that detaching them
does not work). Only the re-weighting factor ``alpha = 1 + |p - u|`` of Eq. 7 is detached. In
HIoU (Eq. 8) the weight ``(1 + u) ** gamma`` is NOT detached either.

Both losses are per-sample (output shape = input shape). Reduction is the caller's: Eq. 9 sums
them over the positives and divides by the detector's own box-loss normalizer.
"""
import math
from typing import Dict

import torch
from torch import Tensor

__all__ = [
    "task_correlation",
    "tcorr_loss",
    "hiou_loss",
    "hqod_losses",
    "hardet_losses",
    "aligned_box_iou",
    "gt_class_scores",
]

#: Added inside the powers of Eq. 5 so that p**u and u**p (and their gradients) stay finite when
#: p or u is exactly 0 (a float32 sigmoid underflows to 0 for logits below about -104).
TCORR_EPS = 1e-6


def task_correlation(p: Tensor, u: Tensor, eps: float = TCORR_EPS) -> Tensor:
    """
    Task correlation indicator of HQOD Eq. 5 with the dynamic exponents of Eq. 6::

        c = p ** beta_cls * u ** beta_reg,   beta_cls = u,   beta_reg = p

    computed as ``exp(u * log(p + eps) + p * log(u + eps))``. ``eps`` keeps the value and both
    partial derivatives finite at p = 0 or u = 0 (c(0, 0) = 1, the limit 0 ** 0); elsewhere it
    changes c by a relative eps * (u / p + p / u) or so (c(1, 1) = (1 + eps) ** 2). Where u is
    exactly 0 (a predicted box that misses its ground truth, or FCOS's zero-size boxes at
    initialization) c = eps ** p, its value at u = eps: continuous in u, whereas the exact 0 ** p
    jumps from 1 at p = 0 to 0 for p > 0 (so c is close to 1 there when p is tiny).
    Nothing is detached.

    Args:
        p (Tensor): scores of the ground-truth class, in [0, 1].
        u (Tensor): IoUs of the predicted boxes with their ground truth, in [0, 1];
            same shape as ``p``.
        eps (float): see above.

    Returns:
        Tensor: c, same shape as the inputs.
    """
    return torch.exp(u * torch.log(p + eps) + p * torch.log(u + eps))


def tcorr_loss(p: Tensor, u: Tensor, eps: float = TCORR_EPS) -> Tensor:
    """
    Per-sample Task-Correlated loss, HQOD Eq. 7::

        L_TCorr = alpha * (exp(-c) - exp(-1)),   alpha = 1 + |p - u|   (alpha detached)

    with c from :func:`task_correlation` (Eq. 5-6). The value is 0 when p = u = 1 (up to eps) and
    largest, 2 * (1 - 1/e), when one score is 1 and the other 0. Gradients reach both ``p`` and
    ``u``, through the bases and through the dynamic exponents; ``alpha`` only re-weights.

    Args:
        p, u (Tensor): see :func:`task_correlation`; same shape, floating point.
        eps (float): see :func:`task_correlation`.

    Returns:
        Tensor: the loss of each sample, same shape as the inputs (no reduction).
    """
    if p.shape != u.shape:
        raise ValueError(
            f"p and u must have the same shape; got {tuple(p.shape)} and {tuple(u.shape)}"
        )
    c = task_correlation(p, u, eps)
    alpha = (1.0 + (p - u).abs()).detach()  # Eq. 7: "does not accept gradient backpropagation"
    return alpha * (torch.exp(-c) - math.exp(-1.0))


def hiou_loss(u: Tensor, gamma: float = 0.8, sigma: float = 1.0) -> Tensor:
    """
    Per-sample Harmonious IoU loss, HQOD Eq. 8, times the trade-off factor sigma of Eq. 9::

        sigma * L_HIoU = sigma * (1 + u) ** gamma * (1 - u)

    ``sigma`` defaults to 1 so that ``hiou_loss(u)`` is Eq. 8 exactly; the HQOD detectors pass
    their ``sigma`` (1.5 in the paper). The weight ``(1 + u) ** gamma`` is NOT detached: the
    gradient, -(1 + u) ** (gamma - 1) * ((1 + gamma) * u + 1 - gamma), grows in magnitude with u,
    which is how HIoU favours high-IoU samples. Smooth on [0, 1]: no eps needed.

    Args:
        u (Tensor): IoUs of the predicted boxes with their ground truth, in [0, 1].
        gamma (float): exponent of the adaptive weight (0.8 in the paper).
        sigma (float): factor of Eq. 9.

    Returns:
        Tensor: the loss of each sample, same shape as ``u`` (no reduction).
    """
    return sigma * (1.0 + u).pow(gamma) * (1.0 - u)


def hqod_losses(
    p: Tensor,
    u: Tensor,
    normalizer,
    *,
    tcorr: bool = True,
    hiou: bool = True,
    sigma: float = 1.5,
    gamma: float = 0.8,
) -> Dict[str, Tensor]:
    """
    The extra term of HQOD Eq. 9, ``1/P * sum_i (L_TCorr^i + sigma * L_HIoU^i)``, as two named
    losses. Both sums run over the positives and are divided by ``normalizer``, which must be the
    detector's own box-loss normalizer (the "P" of Eq. 9: the number of positives, or its EMA, or
    ATSS's centerness-target sum).

    Args:
        p, u (Tensor): shape (P,), see :func:`tcorr_loss`.
        normalizer (float or Tensor): the box-loss normalizer.
        tcorr, hiou (bool): which of the two terms to return.
        sigma, gamma (float): see :func:`hiou_loss`.

    Returns:
        dict[str, Tensor]: ``loss_tcorr`` and/or ``loss_hiou`` (empty if both are off). With no
        positives the sums are zeros that still belong to the autograd graph.
    """
    losses = {}
    if tcorr:
        losses["loss_tcorr"] = tcorr_loss(p, u).sum() / normalizer
    if hiou:
        losses["loss_hiou"] = hiou_loss(u, gamma=gamma, sigma=sigma).sum() / normalizer
    return losses


def hardet_losses(
    l_cls: Tensor,
    l_reg: Tensor,
    p: Tensor,
    u: Tensor,
    scores: Tensor,
    normalizer,
    *,
    sigma: float = 1.5,
    gamma: float = 0.8,
    delta_min: float = 0.2,
) -> Dict[str, Tensor]:
    """
    HarDet* (Wang & Zhang, ICCV 2021, as the HQOD authors re-implemented it for their Table III
    baseline; ../shared/notes/lightweight-detectors.md), on the positives' own losses::

        1. L_reg1 = L_reg + sigma * (1 - u) * (1 + u) ** gamma       (the harmonic IoU term)
        2. L_reg2 = (1 + exp(-L_cls)) * L_reg1
        3. L_cls' = (1 + exp(-L_reg2)) * L_cls
        4. L_reg' = L_reg2 + delta / (1 + beta),   delta = |p - u| (0 below ``delta_min``),
           beta = exp(sum_c -q_c ln q_c), q the positive's per-class sigmoid scores

    Nothing is detached. Returned as the differences to the detector's own losses, summed over
    the positives and divided by its normalizer: ``loss_hardet_cls = sum(L_cls' - L_cls) / P``,
    ``loss_hardet_reg = sum(L_reg' - L_reg) / P``, so that the detector's ``loss_cls`` and
    ``loss_box_reg`` plus these are HarDet's losses.

    Args:
        l_cls (Tensor): (P,) each positive's classification loss (focal loss summed over classes).
        l_reg (Tensor): (P,) each positive's box loss (summed over coordinates).
        p, u (Tensor): (P,) the ground-truth class's score and the IoU, see :func:`tcorr_loss`.
        scores (Tensor): (P, K) the positives' per-class sigmoid scores.
        normalizer (float or Tensor): the detector's box-loss normalizer.
        sigma, gamma (float): the harmonic IoU term of step 1 (:func:`hiou_loss`).
        delta_min (float): |p - u| below this counts as 0 in step 4.
    """
    l_reg1 = l_reg + hiou_loss(u, gamma=gamma, sigma=sigma)
    l_reg2 = (1.0 + torch.exp(-l_cls)) * l_reg1
    l_cls_new = (1.0 + torch.exp(-l_reg2)) * l_cls
    delta = (p - u).abs()
    delta = torch.where(delta < delta_min, torch.zeros_like(delta), delta)
    beta = torch.exp(-torch.special.xlogy(scores, scores).sum(dim=1))
    l_reg_new = l_reg2 + delta / (1.0 + beta)
    return {
        "loss_hardet_cls": (l_cls_new - l_cls).sum() / normalizer,
        "loss_hardet_reg": (l_reg_new - l_reg).sum() / normalizer,
    }


def aligned_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """
    IoU of each box of ``boxes1`` with the box of ``boxes2`` at the same index, differentiable
    w.r.t. both (the ``u`` of HQOD when ``boxes1`` are decoded predictions).

    Args:
        boxes1, boxes2 (Tensor): (..., 4) boxes in XYXY format, same shape.
        eps (float): lower bound of the union, so that degenerate boxes give a finite IoU.

    Returns:
        Tensor: (...) IoUs in [0, 1] for valid boxes.
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = (area1 + area2 - inter).clamp(min=eps)
    return inter / union


def gt_class_scores(logits: Tensor, gt_classes: Tensor) -> Tensor:
    """
    Sigmoid score of the ground-truth class of each sample (the ``p`` of HQOD).

    Args:
        logits (Tensor): (P, K) classification logits of P positive samples.
        gt_classes (Tensor): (P,) int64 ground-truth classes in [0, K).

    Returns:
        Tensor: (P,) probabilities, differentiable w.r.t. ``logits``.
    """
    return logits.gather(1, gt_classes[:, None].long()).squeeze(1).sigmoid()
