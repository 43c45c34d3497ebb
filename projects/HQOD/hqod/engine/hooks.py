"""
Training hooks that never leave a broken state behind: detectron2's PeriodicCheckpointer and
EvalHook that skip a run whose last iteration failed (a NaN / inf loss) and never save
non-finite weights, and :func:`diverged`, the one-line report of such a failure.
"""
import re

import torch

from detectron2.engine import hooks

from .checkpoint import Checkpointer
from .defaults import TrainingDiverged

__all__ = ["SafePeriodicCheckpointer", "SafeEvalHook", "diverged"]


def _non_finite(model):
    return [
        k
        for k, v in model.state_dict().items()
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


class _CompletionMixin:
    """Knows whether the last iteration of the run completed (after_step is not called for an
    iteration whose step raised, e.g. on a NaN loss)."""

    def before_train(self):
        super().before_train()
        self._last_done = None

    def after_step(self):
        self._last_done = self.trainer.iter
        super().after_step()

    def _completed(self):
        t = self.trainer
        if t.start_iter >= t.max_iter:  # nothing to run: a finished run resumed
            return True
        return self._last_done is not None and self._last_done >= t.max_iter - 1


class SafePeriodicCheckpointer(_CompletionMixin, hooks.PeriodicCheckpointer):
    """detectron2's PeriodicCheckpointer that never saves a broken state: no final checkpoint
    after a failed iteration, and no checkpoint of non-finite weights (FloatingPointError
    instead), so ``last_checkpoint`` always names the last good state."""

    def after_step(self):
        it = self.trainer.iter
        if (it + 1) % self.period == 0 or it >= self.trainer.max_iter - 1:
            bad = _non_finite(self.checkpointer.model)
            if bad:
                raise FloatingPointError(
                    f"Weights became infinite or NaN at iteration={it} ({len(bad)} tensors, e.g. "
                    f"{bad[0]}); not saved."
                )
        super().after_step()

    def after_train(self):
        if self._completed():
            super().after_train()


class SafeEvalHook(_CompletionMixin, hooks.EvalHook):
    """detectron2's EvalHook that does not evaluate a run that failed (its model may be NaN)."""

    def after_train(self):
        if self._completed():
            return super().after_train()
        del self._func


def diverged(error, output_dir) -> TrainingDiverged:
    """One line for detectron2's FloatingPointError: iteration, loss values, last good
    checkpoint, what to do."""
    text = re.sub(r"np\.float\d*\(([^)]*)\)", r"\1", str(error))
    m = re.search(r"iteration=(\d+)", text)
    losses = re.search(r"loss_dict = \{(.*)\}", text, re.S)
    what = f"at iteration {m.group(1)}" if m else ""
    values = ""
    if losses:
        values = " (" + ", ".join(x.strip().replace("'", "") for x in losses.group(1).split(",")) + ")"
    elif "not saved" in text:
        values = " (" + text.split("(", 1)[1].rsplit(")", 1)[0] + ")" if "(" in text else ""
    kind = "weights" if text.startswith("Weights") else "loss"
    ckpt = Checkpointer(torch.nn.Module(), output_dir)
    last = ckpt.get_checkpoint_file() if ckpt.has_checkpoint() else ""
    keep = (
        f"the last good checkpoint is {last} (last_checkpoint); continue from it with --resume "
        "and a lower optimizer.lr"
        if last
        else "no checkpoint had been written; lower optimizer.lr and start again"
    )
    return TrainingDiverged(
        f"Training stopped: the {kind} became infinite or NaN {what}{values}. Nothing was saved "
        f"after it; {keep}."
    )
