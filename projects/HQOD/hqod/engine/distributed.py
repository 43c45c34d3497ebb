"""
What a model needs to train in several processes as it trains in one with the same total batch:

* :func:`convert_sync_batchnorm`: every BatchNorm (backbone, FPN, the per-level BNs of the
  multi-level head, quantized BNs included) becomes synchronized BN — PyTorch's
  ``SyncBatchNorm`` with CUDA, :class:`SyncBatchNormCPU` on CPU (PyTorch's needs a GPU).

The loss normalizers are made global by :mod:`hqod.engine.loss_normalizers`. tools/train_net.py
(``build_model``) converts the BNs when ``comm.get_world_size() > 1``.
"""
import torch
from fvcore.nn.distributed import differentiable_all_reduce
from torch import nn

from detectron2.layers import NaiveSyncBatchNorm
from detectron2.utils import comm

from hqod.quantization.modules import QUANT_MODULES, QBatchNorm2d, QNaiveSyncBatchNorm, QSyncBatchNorm
from hqod.quantization.modules import _OutputQuantBN
from hqod.utils import rebuild_as, replace_child

__all__ = ["SyncBatchNormCPU", "QSyncBatchNormCPU", "convert_sync_batchnorm"]


class SyncBatchNormCPU(NaiveSyncBatchNorm):
    """
    Synchronized BN for CPU processes (gloo), exact: the statistics are those of the whole
    batch over all processes, as one ``nn.BatchNorm2d`` computes them over the concatenated
    batch — two passes in float64 (mean, then the centered variance; PyTorch's CPU BN also
    accumulates in double), each one differentiable all-reduce, and the sample counts are
    all-reduced too, so processes may hold different batch or image sizes. Running statistics
    as ``nn.BatchNorm2d``: unbiased running variance, ``num_batches_tracked`` counted.
    (detectron2's NaiveSyncBatchNorm computes var = E[x²] - E[x]² in float32, which loses
    precision when |mean| >> std, averages per-process statistics with equal weights and
    updates the running variance with the biased one.)
    """

    def forward(self, input):
        if comm.get_world_size() == 1 or not self.training:
            return super().forward(input)
        C = input.shape[1]
        x = input.float() if input.dtype == torch.float16 else input
        dims = [0, 2, 3]
        count = torch.full((1,), float(x.numel() // C), dtype=torch.float64)
        vec = differentiable_all_reduce(torch.cat([x.sum(dims, dtype=torch.float64), count]))
        n = vec[-1].detach()
        if float(n) < 2:
            raise ValueError(f"SyncBatchNormCPU needs more than 1 value per channel; got {int(n)}.")
        mean = vec[:C] / n
        centered = x - mean.to(x.dtype).reshape(1, -1, 1, 1)
        var = differentiable_all_reduce((centered * centered).sum(dims, dtype=torch.float64)) / n
        invstd = torch.rsqrt(var + self.eps).to(x.dtype)
        scale = self.weight * invstd if self.affine else invstd
        out = centered * scale.reshape(1, -1, 1, 1)
        if self.affine:
            out = out + self.bias.reshape(1, -1, 1, 1)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
            with torch.no_grad():
                m = mean.detach().to(self.running_mean.dtype)
                unbiased = (var.detach() * (n / (n - 1))).to(self.running_var.dtype)
                self.running_mean.mul_(1 - momentum).add_(m, alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        return out.to(input.dtype)


@QUANT_MODULES.register()
class QSyncBatchNormCPU(_OutputQuantBN, SyncBatchNormCPU):
    """:class:`SyncBatchNormCPU` with its output fake-quantized (scope ``aqd``)."""

    float_types = (SyncBatchNormCPU,)


def _sync_class(module: nn.Module, cuda: bool):
    """The synchronized class replacing ``type(module)``, or None to leave it."""
    t = type(module)
    if cuda:
        table = {
            nn.BatchNorm2d: nn.SyncBatchNorm,
            NaiveSyncBatchNorm: nn.SyncBatchNorm,
            SyncBatchNormCPU: nn.SyncBatchNorm,
            QBatchNorm2d: QSyncBatchNorm,
            QNaiveSyncBatchNorm: QSyncBatchNorm,
            QSyncBatchNormCPU: QSyncBatchNorm,
        }
    else:
        table = {
            nn.BatchNorm2d: SyncBatchNormCPU,
            NaiveSyncBatchNorm: SyncBatchNormCPU,
            QBatchNorm2d: QSyncBatchNormCPU,
            QNaiveSyncBatchNorm: QSyncBatchNormCPU,
        }
    return table.get(t)


def convert_sync_batchnorm(model: nn.Module, cuda: bool = None) -> int:
    """
    Replace every ``BatchNorm2d`` (plain, quantized, or detectron2's NaiveSyncBatchNorm) of
    ``model`` by synchronized BN holding the same parameters and buffers
    (:func:`hqod.utils.rebuild_as`): state-dict keys are unchanged, so checkpoints load either
    way. ``cuda`` (default: whether the model's parameters are on a GPU) picks PyTorch's
    SyncBatchNorm or :class:`SyncBatchNormCPU`. Returns the number of replaced modules.
    """
    if cuda is None:
        p = next(model.parameters(), None)
        cuda = p is not None and p.device.type == "cuda"
    n = 0
    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            new_cls = _sync_class(m, cuda)
            if new_cls is None:
                continue
            new = rebuild_as(new_cls, m)
            if isinstance(new, NaiveSyncBatchNorm) and not hasattr(new, "_stats_mode"):
                new._stats_mode = ""
            if isinstance(new, nn.SyncBatchNorm) and not hasattr(new, "process_group"):
                new.process_group = None
            replace_child(parent, name, new)
            n += 1
    return n
