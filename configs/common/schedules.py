"""LR multipliers. ``multistep(max_iter, steps, warmup)`` is scale-free: milestones are fractions."""
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler


def multistep(milestones=(2 / 3, 8 / 9), warmup=0.02, gamma=0.1):
    """Step decay at the given fractions of training, linear warmup over the first fraction."""
    values = [gamma**i for i in range(len(milestones) + 1)]
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=values, milestones=[int(m * 1000) for m in milestones], num_updates=1000
        ),
        warmup_length=warmup,
        warmup_method="linear",
        warmup_factor=0.001,
    )


# COCO 1x (90k iterations at batch 16; decay at 60k and 80k), as detectron2.
lr_multiplier_1x = multistep((60 / 90, 80 / 90), warmup=1000 / 90000)
# Short schedules for the embedded dataset (decay at 75% and 90%).
lr_multiplier_short = multistep((0.75, 0.9), warmup=0.05)
