"""Optimizer parameter groups for QAT: quantizer steps / thresholds / intervals get no weight
decay (decaying them would shrink the quantization range towards zero)."""
from typing import Any, Dict, List, Optional

from torch import nn

from detectron2.solver.build import get_default_optimizer_params, reduce_param_groups

from .quantizers import Quantizer

__all__ = ["get_qat_optimizer_params", "quantizer_parameters"]


def quantizer_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The learned parameters of every quantizer of ``model``."""
    return [p for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()]


def get_qat_optimizer_params(
    model: nn.Module,
    *,
    weight_decay_quant: float = 0.0,
    lr_factor_quant: float = 1.0,
    base_lr: Optional[float] = None,
    **kwargs,
) -> List[Dict[str, Any]]:
    """
    detectron2's ``get_default_optimizer_params(model, base_lr=..., **kwargs)`` (e.g.
    ``weight_decay_norm=0.0``), with the quantizer parameters given ``weight_decay_quant``
    (0 by default) and, if ``lr_factor_quant != 1`` (needs ``base_lr``), ``lr = base_lr *
    lr_factor_quant``. Usable from a LazyConfig like detectron2's function::

        optimizer.params = L(get_qat_optimizer_params)(weight_decay_norm=0.0)
        # train_net sets optimizer.params.model = model before instantiating
    """
    groups = get_default_optimizer_params(model, base_lr=base_lr, **kwargs)
    quant = {id(p) for p in quantizer_parameters(model)}
    quant_hparams = {"weight_decay": weight_decay_quant}
    if lr_factor_quant != 1.0:
        if base_lr is None:
            raise ValueError("lr_factor_quant requires base_lr")
        quant_hparams["lr"] = base_lr * lr_factor_quant
    out = []
    for group in groups:
        hparams = {k: v for k, v in group.items() if k != "params"}
        plain = [p for p in group["params"] if id(p) not in quant]
        steps = [p for p in group["params"] if id(p) in quant]
        if plain:
            out.append({"params": plain, **hparams})
        if steps:
            out.append({"params": steps, **hparams, **quant_hparams})
    return reduce_param_groups(out)
