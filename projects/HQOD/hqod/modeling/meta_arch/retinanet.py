"""RetinaNet with the HQOD losses (HQOD Eq. 9 on top of detectron2's RetinaNet losses)."""
import torch

from detectron2.config import configurable
from detectron2.modeling.meta_arch.build import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet

from .hqod_mixin import HQODLossMixin, hqod_args_from_cfg

__all__ = ["HQODRetinaNet"]


@META_ARCH_REGISTRY.register()
class HQODRetinaNet(HQODLossMixin, RetinaNet):
    """
    :class:`RetinaNet` trained with the HQOD losses: ``loss_tcorr`` (Eq. 5-7) and ``loss_hiou``
    (Eq. 8, times sigma) are added to ``loss_cls`` and ``loss_box_reg``.

    p is the sigmoid score of the ground-truth class of each positive anchor, u the IoU of the
    box decoded from the anchor and its predicted deltas with the matched ground-truth box. The
    terms are summed over the positives (anchors the matcher labels foreground; ignored anchors
    excluded) and divided by RetinaNet's box-loss normalizer, the EMA of the number of positives.
    With ``tcorr=False, hiou=False`` the model is exactly :class:`RetinaNet`.
    """

    @configurable
    def __init__(
        self,
        *,
        tcorr: bool = True,
        hiou: bool = True,
        sigma: float = 1.5,
        gamma: float = 0.8,
        **kwargs,
    ):
        """
        Args:
            tcorr (bool): add the Task-Correlated loss (Eq. 7), logged as ``loss_tcorr``.
            hiou (bool): add the Harmonious IoU loss (Eq. 8), logged as ``loss_hiou``.
            sigma (float): weight of the HIoU loss (Eq. 9).
            gamma (float): exponent of the HIoU adaptive weight (Eq. 8).
            kwargs: arguments of :class:`RetinaNet`.
        """
        super().__init__(**kwargs)
        self._init_hqod(tcorr=tcorr, hiou=hiou, sigma=sigma, gamma=gamma)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret.update(hqod_args_from_cfg(cfg))
        return ret

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """
        Same arguments as :meth:`RetinaNet.losses`. Returns its losses plus ``loss_tcorr`` and
        ``loss_hiou`` for the enabled switches.
        """
        losses = super().losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)
        if not self.hqod_enabled:
            return losses
        # RetinaNet.losses has just updated its EMA normalizer: reuse it (Eq. 9's 1/P).
        losses.update(
            self.hqod_loss_terms(
                anchors,
                pred_logits,
                pred_anchor_deltas,
                torch.stack(gt_labels),
                torch.stack(gt_boxes),
                self.loss_normalizer,
            )
        )
        return losses
