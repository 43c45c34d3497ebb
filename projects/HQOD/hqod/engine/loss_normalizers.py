"""
The loss normalizers of detectron2's dense detectors as registered training state.

RetinaNet and FCOS divide their losses by an EMA of the number of positive anchors
(``DenseDetector._ema_update(name, value, initial_value, momentum)``), which detectron2 keeps in a
plain float attribute: no state dict holds it, and in a multi-process run each process would
average only its own positives. :func:`track_loss_normalizers` gives every dense detector a
:class:`LossNormalizers` child whose buffers hold these EMAs:

* global over processes: the EMA of the total number of positives (what one process with the
  whole batch computes); the detector divides by that EMA over the number of processes, so that
  DDP's gradient average equals the single-process gradient (one process: detectron2's EMA,
  bit for bit);
* checkpointed as training state (:class:`hqod.engine.ExtraTrainingState` saves every
  :class:`LossNormalizers`), so a resumed run continues the EMA, in any number of processes. The
  buffers are not persistent: model files (``model_final.pth``) stay detectron2's, and QAT,
  a new run started from an FP32 detector, starts its EMA afresh as detectron2 does.
"""
import types

import torch
import torch.distributed as dist
from torch import nn

from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.utils import comm

__all__ = ["LossNormalizers", "track_loss_normalizers"]


def _sum_over_processes(value: float) -> float:
    if comm.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


class LossNormalizers(nn.Module):
    """EMAs by name (``loss_normalizer``), one float64 buffer each, registered at the first
    update (or when a checkpoint restores it)."""

    def set(self, name: str, value: float) -> None:
        if name in self._buffers:
            self._buffers[name].fill_(value)
        else:
            self.register_buffer(name, torch.tensor(float(value), dtype=torch.float64), persistent=False)

    def update(self, name: str, value: float, initial_value: float, momentum: float) -> float:
        """``old * momentum + value * (1 - momentum)`` (old: ``initial_value`` at the first
        update) in float64, stored and returned."""
        old = float(self._buffers[name]) if name in self._buffers else initial_value
        new = old * momentum + value * (1 - momentum)
        self.set(name, new)
        return new

    def values(self):
        return {name: float(buf) for name, buf in self._buffers.items()}


def _ema_update(self, name, value, initial_value, momentum=0.9):
    """``DenseDetector._ema_update`` with the EMA of the sum over processes kept in
    ``self.loss_normalizers``; returns (and sets ``self.<name>`` to) EMA / number of processes."""
    world = comm.get_world_size()
    normalizer = self.loss_normalizers.update(name, _sum_over_processes(value), initial_value, momentum) / world
    setattr(self, name, normalizer)  # where detectron2 keeps it (read e.g. by the HQOD losses)
    return normalizer


def track_loss_normalizers(model: nn.Module) -> int:
    """Give every detectron2 ``DenseDetector`` in ``model`` (RetinaNet, FCOS, their HQOD
    subclasses) a ``loss_normalizers`` child (:class:`LossNormalizers`) and its
    ``_ema_update`` on it. In place; returns the number of detectors."""
    n = 0
    for m in model.modules():
        if isinstance(m, DenseDetector) and not isinstance(getattr(m, "loss_normalizers", None), LossNormalizers):
            m.loss_normalizers = LossNormalizers()
            m._ema_update = types.MethodType(_ema_update, m)
            n += 1
    return n
