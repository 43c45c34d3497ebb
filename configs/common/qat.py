"""
What every QAT config of the matrix ``configs/<det>_<backbone>_<qat>_w<bits>[_hqod].py`` shares:
the QAT methods (``QAT_METHODS``), fine-tuning from the FP32 detector (:func:`to_qat`) and the
HQOD switch (:func:`with_hqod`; HarDet*, the baseline: :func:`with_hardet`). A matrix file is a few lines over these, e.g.::

    from .common.qat import quant_config, to_qat
    from .retina_r18_fp32 import dataloader, lr_multiplier, model, optimizer, train

    quant = quant_config("aqd", bits=2)
    to_qat(train, optimizer, lr_multiplier, quant, fp32="retina_r18_fp32", name="retina_r18_aqd_w2")
"""
import copy

from hqod.modeling import hqod_variant
from hqod.solver import ClippedSGD
from hqod.solver.schedules import clip_max_norm

from .quant import qat_optimizer_params, quant
from .schedules import preset_schedule

# name in the config file -> fields of the quant node (configs/common/quant.py documents them).
# Every method uses multi-level BN in the head (one BN per FPN level, indexed by level).
QAT_METHODS = {
    "lsq": dict(method="lsq", scope="aqd_star"),  # LSQ (HQOD Eq. 2-3), convs quantized
    "tqt": dict(method="tqt", scope="aqd_star"),  # TQT: power-of-two steps, convs quantized
    "aqdstar": dict(method="lq", scope="aqd_star"),  # AQD*: AQD's quantizer, convs quantized
    "aqd": dict(method="lq", scope="aqd"),  # AQD: also BN outputs, residual and FPN adds
}

# Whose fine-tuning recipe a quantizer follows (hqod/solver/schedules.py has the recipes, by
# dataset preset, from ../shared/notes/method-facts.md):
#   "hqod" (HQOD, and its LSQ/TQT baselines): W4 lr 1e-3, 16 epochs, steps at 8 and 14; W2 lr
#   1e-2, 18 epochs, steps at 9, 14 and 17; warm-up; gradient clipping (max norm 35). W3, which
#   HQOD does not report, takes the W4 recipe.
#   "aqd" (AQD's LQ quantizer): the FP32 schedule (COCO: detectron2's 1x) at lr 1e-3, 2e-3 for W2.
# On the embedded dataset a QAT run is a fifth of the FP32 one (280 iterations) with the
# recipe's learning rate and the shape of its COCO schedule.
RECIPE_FAMILY = {"lsq": "hqod", "tqt": "hqod", "lsq_torch": "hqod", "lq": "aqd"}


def quant_config(method: str, bits: int):
    """A fresh ``quant`` node for one of QAT_METHODS at W``bits``A``bits``."""
    node = copy.deepcopy(quant)
    node.update(QAT_METHODS[method], weight_bits=bits, act_bits=bits)
    return node


def to_qat(train, optimizer, lr_multiplier, quant, *, fp32: str, name: str):
    """Turn the FP32 config's ``train``/``optimizer``/``lr_multiplier`` into QAT fine-tuning
    with ``quant`` from ``output/<fp32>/model_final.pth`` (what ``configs/<fp32>.py`` writes),
    output to ``output/<name>``, in float32: the schedule of the recipe
    ``<family>_w<weight bits>`` (:data:`RECIPE_FAMILY`) on the config's dataset preset, with its
    gradient clipping; zero weight decay on quantizer steps."""
    recipe = f"{RECIPE_FAMILY[quant.method]}_w{quant.weight_bits}"
    train.init_checkpoint = f"output/{fp32}/model_final.pth"
    train.amp.enabled = False  # float32; True: convolutions on bfloat16 codes (hqod.engine.amp)
    train.output_dir = f"./output/{name}"
    preset_schedule(train, optimizer, recipe, lr_multiplier)
    optimizer.params = copy.deepcopy(qat_optimizer_params)
    max_norm = clip_max_norm(recipe)
    if max_norm is not None:
        optimizer._target_ = ClippedSGD
        optimizer.max_norm = max_norm


def with_hqod(model, train):
    """Add the HQOD losses (TCorr + HIoU, sigma 1.5, gamma 0.8) to the detector: its HQOD
    subclass. Ablations are overrides: ``model.tcorr=False`` (HIoU only), ``model.hiou=False``."""
    model._target_ = hqod_variant(model._target_)
    model.update(harmony="hqod", tcorr=True, hiou=True, sigma=1.5, gamma=0.8)
    train.output_dir = train.output_dir + "_hqod"


def with_hardet(model, train):
    """Train the detector with HarDet* instead (HQOD's Table III baseline, the HQOD authors'
    re-implementation: ``hqod.losses.hardet_losses``; its harmonic IoU term with sigma 1.5,
    gamma 0.8): the same HQOD subclass with ``harmony="hardet"``."""
    model._target_ = hqod_variant(model._target_)
    model.update(harmony="hardet", sigma=1.5, gamma=0.8)
    train.output_dir = train.output_dir + "_hardet"
