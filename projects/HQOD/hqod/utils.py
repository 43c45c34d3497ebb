"""Small helpers shared by the package."""
import copy

import torch
from torch import nn

__all__ = ["all_subclasses", "adopt_state", "bn_affine", "rebuild_as", "replace_child"]


def all_subclasses(cls) -> set:
    """Every class defined so far that derives from ``cls``, directly or not."""
    found, todo = set(), [cls]
    while todo:
        new = [c for c in todo.pop().__subclasses__() if c not in found]
        found.update(new)
        todo += new
    return found


def adopt_state(new: nn.Module, module: nn.Module) -> None:
    """
    For the ``__init__`` of a module built from another (a quantized layer from its float
    layer): initialize ``new`` as an ``nn.Module`` holding the state of ``module`` — the same
    parameter, buffer and child objects under the same names (state-dict keys unchanged), its
    hooks and its other attributes. ``module`` itself is left as it is.
    """
    nn.Module.__init__(new)
    own = vars(new)
    for key, value in vars(module).items():
        # nn.Module's own containers (_parameters, _modules, hooks...) are copied, not shared
        own[key] = copy.copy(value) if key in own and isinstance(value, (dict, set)) else value


def rebuild_as(cls: type, module: nn.Module) -> nn.Module:
    """A new ``cls`` holding the state of ``module`` (:func:`adopt_state`), for a class of the
    same state and parameters (e.g. a synchronized BN from a BN)."""
    new = cls.__new__(cls)
    adopt_state(new, module)
    return new


def replace_child(parent: nn.Module, name: str, new: nn.Module) -> None:
    """``parent.<name> = new``, also where ``parent`` keeps that child in a plain list or tuple
    attribute (detectron2's FPN keeps its convs in ``lateral_convs`` and ``output_convs``)."""
    old = getattr(parent, name)
    setattr(parent, name, new)
    for key, value in list(vars(parent).items()):
        if isinstance(value, (list, tuple)) and any(v is old for v in value):
            vars(parent)[key] = type(value)(new if v is old else v for v in value)


def bn_affine(norm: nn.Module, dtype=None):
    """``(gamma / sqrt(var + eps), beta - mean * gamma / sqrt(var + eps))``: the per-channel
    multiplier and shift an inference-mode BN applies, in ``dtype`` (default: the BN's)."""
    weight, bias, mean, var = (t.to(dtype) for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var))
    mult = weight / torch.sqrt(var + norm.eps)
    return mult, bias - mean * mult
