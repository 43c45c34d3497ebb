"""
The schedule of a config by recipe name ("fp32", "hqod_w4", "aqd_w2", ...), for the config's
dataset preset and total batch: :func:`preset_schedule` points ``train.max_iter``,
``train.eval_period``, ``train.checkpointer.period``, ``optimizer.lr`` and the LR multiplier at
``${hqod_schedule:${dataloader.dataset},<recipe>,${dataloader.train.total_batch_size},<key>}``
(tables and rules: ``hqod/solver/schedules.py``). So ``dataloader.dataset=coco`` trains the
recipe's COCO schedule, and ``dataloader.train.total_batch_size=8`` rescales it (linear scaling:
lr x 8/16, iterations, LR steps, warm-up and periods x 16/8).
"""
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler

import hqod.solver.schedules  # noqa: F401  registers the hqod_schedule resolver


def _value(recipe: str, key: str) -> str:
    return f"${{hqod_schedule:${{dataloader.dataset}},{recipe},${{dataloader.train.total_batch_size}},{key}}}"


def preset_schedule(train, optimizer, recipe: str, lr_multiplier=None):
    """Point ``train``'s iterations and periods, ``optimizer.lr`` and the LR multiplier at
    ``recipe``'s schedule on the config's dataset preset and batch, and return the LR multiplier
    (x0.1 at each step, linear warm-up from x0.001): ``lr_multiplier`` updated in place, or a new
    one."""
    train.max_iter = _value(recipe, "max_iter")
    train.eval_period = _value(recipe, "eval_period")
    train.checkpointer.period = _value(recipe, "checkpoint_period")
    optimizer.lr = _value(recipe, "lr")
    if lr_multiplier is None:
        lr_multiplier = L(WarmupParamScheduler)(scheduler=L(MultiStepParamScheduler)())
    lr_multiplier.scheduler.update(
        values=_value(recipe, "values"),
        milestones=_value(recipe, "milestones"),
        num_updates=_value(recipe, "num_updates"),
    )
    lr_multiplier.update(
        warmup_length=_value(recipe, "warmup_length"), warmup_method="linear", warmup_factor=0.001
    )
    return lr_multiplier
