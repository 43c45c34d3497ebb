"""Folding BN into the conv before it, as post-training quantization does (``ptq.fold_bn``)."""
import torch
from torch import nn

from detectron2.layers import Conv2d, FrozenBatchNorm2d

from hqod.utils import bn_affine

__all__ = ["fold_batch_norms", "FOLDABLE_NORMS"]

FOLDABLE_NORMS = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)


@torch.no_grad()
def fold_batch_norms(model: nn.Module) -> int:
    """
    Fold the BN of every detectron2 ``Conv2d`` (its ``norm``) into the conv, in place, with the
    BN's running statistics: ``W' = W * g / sqrt(var + eps)``, ``b' = (b - mean) * g /
    sqrt(var + eps) + beta``; the conv gets a bias and no norm. The result computes what the
    model computes in eval mode. Returns the number of folded BNs.

    Norms standing apart from the conv (the dense heads' per-level BN) are left: a conv shared
    over the FPN levels with one BN per level has no single folded weight. A conv norm that is
    not a BN (GroupNorm, LayerNorm) cannot be folded: an error naming the layer.
    """
    folded = 0
    for name, conv in model.named_modules():
        if not isinstance(conv, Conv2d) or conv.norm is None:
            continue
        norm = conv.norm
        if not isinstance(norm, FOLDABLE_NORMS):
            raise ValueError(
                f"ptq.fold_bn: the norm of {name} is a {type(norm).__qualname__}, which has no "
                "folded form (only BatchNorm folds into a conv). Set ptq.fold_bn=False to keep "
                "the norms, or build the model with BN."
            )
        scale, shift = bn_affine(norm)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
        conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
        new_bias = bias * scale + shift
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias.detach().clone())
        else:
            conv.bias.copy_(new_bias)
        conv.norm = None
        folded += 1
    return folded
