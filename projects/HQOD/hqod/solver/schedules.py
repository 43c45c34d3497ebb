"""
Training schedules by name. A dataset preset (:mod:`hqod.data.presets`) and a recipe give a run's
iterations, learning rate, LR steps, warm-up and evaluation / checkpoint periods, for the total
batch it trains with. Recipes: ``"fp32"`` (training the FP32 detector from a pretrained backbone),
``"fp32_long"`` (the same for the lightweight detectors, longer on the embedded dataset) and the
QAT fine-tuning recipes ``"<family>_w<bits>"`` (``hqod_w4``, ``aqd_w2``, ...; the family of a
quantizer is ``configs/common/qat.py``'s ``RECIPE_FAMILY``).

Configs read the values through the OmegaConf resolver
``${hqod_schedule:<preset>,<recipe>,<total batch>,<key>}`` (``configs/common/schedules.py``
writes these interpolations), with ``<preset>`` = ``${dataloader.dataset}`` and ``<total batch>``
= ``${dataloader.train.total_batch_size}``. So ``dataloader.dataset=coco`` switches the schedule
with the data, and one override, ``dataloader.train.total_batch_size=B``, rescales it by the
linear scaling rule (Goyal et al., "ImageNet in 1 hour"), as detectron2's
``DefaultTrainer.auto_scale_workers`` does from ``SOLVER.REFERENCE_WORLD_SIZE``: with
k = B / (the preset's batch), the learning rate is multiplied by k and the iterations, LR steps,
warm-up and evaluation / checkpoint periods are divided by k (rounded to the nearest iteration,
halves up). The preset's batch (``batch_size``: 16 for COCO and VOC, as 8 GPUs x 2 images in the
papers; 4 for digits) is the reference. Keys set on the command line (``train.max_iter=...``,
``optimizer.lr=...``) replace the derived values; the LR schedule is a fraction of training
(milestones / num_updates), so a new ``train.max_iter`` alone stretches it.

Keys: ``max_iter``, ``lr``, ``milestones``, ``num_updates``, ``values`` (LR factors, x0.1 per
step), ``warmup_length`` (fraction of training, detectron2's ``WarmupParamScheduler``),
``eval_period``, ``checkpoint_period``. On COCO and VOC the milestones are iterations and
``num_updates`` is ``max_iter``, as detectron2's own configs write them; the embedded dataset's
short schedules are written per mille of training (``num_updates`` 1000).

Where the papers and the authors' code (``../shared/notes/method-facts.md``) are silent, the
choice is ours and the comments below say so.
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

from omegaconf import OmegaConf

from hqod.data.presets import preset_value

__all__ = ["Recipe", "RECIPES", "DIGITS", "SCHEDULE_KEYS", "schedule", "schedule_value", "clip_max_norm"]


@dataclass(frozen=True)
class Recipe:
    """A schedule as a paper states it, at the preset's batch (its ``batch_size``)."""

    lr: float  # base learning rate
    length: float  # training length in ``unit``
    steps: Tuple[float, ...]  # learning rate x0.1 at each of these points, in ``unit``
    unit: str  # "iter" (iterations) or "epoch" (passes over the preset's ``train_images``)
    warmup: int  # iterations of linear warm-up from lr x 0.001
    clip: Optional[float] = None  # max global gradient norm (hqod.solver.ClippedSGD), None: no clipping


# detectron2's COCO 1x: 90k iterations at batch 16, lr 0.01, x0.1 at 60k and 80k, 1k warm-up
# iterations. The AQD paper trains its FP32 detectors with it, and its quantized ones too
# ("training hyper-parameters are the same"), at lr 1e-3 (2e-3 for 2 bits) in the official code.
_1X = dict(length=90000, steps=(60000, 80000), unit="iter", warmup=1000)
# HQOD's QAT (official code, MMDetection): W4 16 epochs, steps at epochs 8 and 14; W2 18 epochs,
# steps at 9, 14 and 17; a warm-up and gradient clipping (MMDetection's grad_clip max_norm 35).
# The warm-up length is not stated: MMDetection's default, 500 iterations (our choice).
_HQOD_W4 = dict(length=16, steps=(8, 14), unit="epoch", warmup=500, clip=35.0)
_HQOD_W2 = dict(length=18, steps=(9, 14, 17), unit="epoch", warmup=500, clip=35.0)


def _qat_recipes(aqd_schedule):
    return {
        "hqod_w4": Recipe(lr=1e-3, **_HQOD_W4),
        "hqod_w3": Recipe(lr=1e-3, **_HQOD_W4),  # HQOD reports no W3: W4's recipe (our choice)
        "hqod_w2": Recipe(lr=1e-2, **_HQOD_W2),
        "aqd_w4": Recipe(lr=1e-3, **aqd_schedule),
        "aqd_w3": Recipe(lr=1e-3, **aqd_schedule),
        "aqd_w2": Recipe(lr=2e-3, **aqd_schedule),  # AQD's 2e-3 "for some 2-bit runs": all W2 here
    }


def _fp32_recipes(schedule):
    # "fp32_long", the FP32 recipe of the lightweight detectors (SSD-lite, YOLOX-tiny), is longer
    # on the embedded dataset only (DIGITS below); on COCO and VOC it is "fp32" (the authors' own
    # 120- and 300-epoch recipes are not used, our choice).
    fp32 = Recipe(lr=0.01, **schedule)
    return {"fp32": fp32, "fp32_long": fp32}


# The papers' datasets, by preset.
_VOC_FP32 = dict(length=12, steps=(9,), unit="epoch", warmup=500)
RECIPES = {
    "coco": {**_fp32_recipes(_1X), **_qat_recipes(_1X)},
    # VOC07+12: the notes are silent; our choices. FP32: MMDetection's RetinaNet VOC07+12 recipe
    # (where HQOD's FP32 detectors come from): 12 epochs at batch 16, lr 0.01, x0.1 after epoch 9;
    # MMDetection's VOC config has no warm-up, we keep 500 iterations as every schedule here.
    # HQOD's QAT: its COCO recipe in epochs, over VOC's images. AQD (which reports no VOC): its
    # rule, the FP32 schedule at its learning rates.
    "voc": {**_fp32_recipes(_VOC_FP32), **_qat_recipes(_VOC_FP32)},
}

# The embedded dataset: short schedules sized for `make demo` (two stages in 15 minutes on 2 CPU
# cores). FP32: 1,400 iterations at batch 4 (2.8 epochs), x0.1 at 75% and 90%. QAT: a fifth of
# that (280 iterations) with the shape of the recipe's COCO schedule (its steps as fractions of
# its length). Learning rates: the COCO recipes' (FP32 0.01). 5% warm-up; evaluation at the end; checkpoints every quarter
# (FP32) or third (QAT) of training. "fp32_long": 3,000 iterations, the same shape (the accuracy
# benchmark's FP32 schedule): SSD-lite's softmax classifier leaves its constant answer only after
# about 1,500 iterations (3.9 AP at 1,400, 26.8 at 3,000) and YOLOX-tiny doubles its AP (20.8 ->
# 44.1; BENCHMARKS.md, issue 18). The QAT schedules stay a fifth of "fp32".
DIGITS = dict(fp32_iters=1400, fp32_long_iters=3000, fp32_steps=(0.75, 0.9), qat_fraction=1 / 5, warmup=0.05)

SCHEDULE_KEYS = (
    "max_iter",
    "lr",
    "milestones",
    "num_updates",
    "values",
    "warmup_length",
    "eval_period",
    "checkpoint_period",
)
# Evaluation and checkpoints on COCO / VOC every 5,000 iterations at batch 16 (detectron2's).
_PERIOD = 5000
_GAMMA = 0.1


def _round(x: float) -> int:
    """Nearest integer, halves up (Python's round() would round halves to even)."""
    return int(math.floor(x + 0.5))


def _recipe(preset: str, recipe: str) -> Recipe:
    table = RECIPES["coco" if preset == "digits" else preset]
    if recipe not in table:
        raise KeyError(f"Unknown training recipe {recipe!r}; known: {', '.join(sorted(table))}.")
    return table[recipe]


def _scale(preset: str, batch) -> float:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(
            f"dataloader.train.total_batch_size must be a positive integer; got {batch!r}."
        )
    return batch / preset_value(preset, "batch_size")


def schedule(preset: str, recipe: str, batch: int) -> dict:
    """The schedule of ``recipe`` on ``preset`` at total batch ``batch``: a dict of
    :data:`SCHEDULE_KEYS`."""
    k = _scale(preset, batch)  # an unknown preset: preset_value's message
    r = _recipe(preset, recipe)
    if preset == "digits":
        if recipe in ("fp32", "fp32_long"):
            max_iter = _round(DIGITS[f"{recipe}_iters"] / k)
            fractions, ckpt = DIGITS["fp32_steps"], max_iter // 4
        else:
            max_iter = _round(DIGITS["fp32_iters"] / k * DIGITS["qat_fraction"])
            fractions, ckpt = [s / r.length for s in r.steps], max(max_iter // 3, 1)
        return dict(
            max_iter=max_iter,
            lr=r.lr * k,
            milestones=[int(f * 1000) for f in fractions],
            num_updates=1000,
            values=[_GAMMA**i for i in range(len(fractions) + 1)],
            warmup_length=DIGITS["warmup"],
            eval_period=max_iter,
            checkpoint_period=ckpt,
        )
    per_unit = preset_value(preset, "train_images") if r.unit == "epoch" else preset_value(preset, "batch_size")
    iters = lambda x: _round(x * per_unit / batch)  # noqa: E731  (x in the recipe's unit)
    max_iter = iters(r.length)
    return dict(
        max_iter=max_iter,
        lr=r.lr * k,
        milestones=[iters(s) for s in r.steps],
        num_updates=max_iter,
        values=[_GAMMA**i for i in range(len(r.steps) + 1)],
        warmup_length=_round(r.warmup / k) / max_iter,
        eval_period=_round(_PERIOD / k),
        checkpoint_period=_round(_PERIOD / k),
    )


def schedule_value(preset: str, recipe: str, batch: int, key: str):
    """One value of :func:`schedule`: the ``hqod_schedule`` resolver."""
    if key not in SCHEDULE_KEYS:
        raise KeyError(f"Unknown schedule key {key!r}; known: {', '.join(SCHEDULE_KEYS)}.")
    return schedule(preset, recipe, batch)[key]


def clip_max_norm(recipe: str) -> Optional[float]:
    """The gradient clipping of ``recipe`` (the same on every dataset), None when it has none."""
    return _recipe("coco", recipe).clip


if not OmegaConf.has_resolver("hqod_schedule"):
    OmegaConf.register_new_resolver("hqod_schedule", schedule_value)
