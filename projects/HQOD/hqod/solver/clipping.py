import torch

__all__ = ["ClippedSGD"]


class ClippedSGD(torch.optim.SGD):
    """
    ``torch.optim.SGD`` that first clips the global norm of the gradients of all its parameters
    to ``max_norm`` (``torch.nn.utils.clip_grad_norm_``), as MMDetection's ``grad_clip=dict(
    max_norm=35, norm_type=2)`` does in the HQOD authors' QAT configs. A drop-in ``_target_``
    for ``configs/common/optim.py``'s SGD: the same arguments plus ``max_norm``/``norm_type``.
    """

    def __init__(self, params, *, max_norm: float = 35.0, norm_type: float = 2.0, **kwargs):
        super().__init__(params, **kwargs)
        if not max_norm > 0:
            raise ValueError(f"optimizer.max_norm must be > 0; got {max_norm!r}.")
        self.max_norm, self.norm_type = float(max_norm), float(norm_type)

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if params:
            grads = [p.grad for p in params]
            total = torch.nn.utils.get_total_norm(grads, self.norm_type, foreach=True)
            if total > self.max_norm:  # else the scale is 1: skip the pass over every gradient
                torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, total, foreach=True)
        return super().step(closure)
