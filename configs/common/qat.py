"""
What every QAT config of the matrix ``configs/<det>_<backbone>_<qat>_w<bits>[_hqod].py`` shares:
the QAT methods (``QAT_METHODS``), fine-tuning from the FP32 detector (:func:`to_qat`) and the
HQOD switch (:func:`with_hqod`). A matrix file is a few lines over these, e.g.::

    from .common.qat import quant_config, to_qat
    from .retina_r18_fp32 import dataloader, lr_multiplier, model, optimizer, train

    quant = quant_config("aqd", bits=2)
    to_qat(train, optimizer, lr_multiplier, quant, fp32="retina_r18_fp32", name="retina_r18_aqd_w2")
"""
import copy

from hqod.modeling import HQODATSS, HQODFCOS, HQODRetinaNet
from hqod.solver import ClippedSGD

from .quant import qat_optimizer_params, quant
from .schedules import multistep

# name in the config file -> fields of the quant node (configs/common/quant.py documents them).
# Every method uses multi-level BN in the head (one BN per FPN level, indexed by level).
QAT_METHODS = {
    "lsq": dict(method="lsq", scope="aqd_star"),  # LSQ (HQOD Eq. 2-3), convs quantized
    "tqt": dict(method="tqt", scope="aqd_star"),  # TQT: power-of-two steps, convs quantized
    "aqdstar": dict(method="lq", scope="aqd_star"),  # AQD*: AQD's quantizer, convs quantized
    "aqd": dict(method="lq", scope="aqd"),  # AQD: also BN outputs, residual and FPN adds
}

# The papers' fine-tuning recipes (../shared/notes/method-facts.md), by the quantizer's family
# and bit width: learning rate as a factor of the FP32 one (0.01 in the papers and here),
# LR steps as fractions of the QAT schedule, and gradient clipping.
#   HQOD (its LSQ/TQT baselines and HQOD itself): W4 lr 1e-3, 16 epochs, steps at 8 and 14;
#   W2 lr 1e-2, 18 epochs, steps at 9, 14 and 17; gradient clipping (max norm 35). W3, which
#   HQOD does not report, takes the W4 recipe.
#   AQD (its LQ quantizer): lr 1e-3, 2e-3 for 2 bits; detectron2's 1x steps (2/3, 8/9).
QAT_RECIPES = {
    "hqod": {
        4: dict(lr_factor=0.1, milestones=(8 / 16, 14 / 16), clip=True),
        3: dict(lr_factor=0.1, milestones=(8 / 16, 14 / 16), clip=True),
        2: dict(lr_factor=1.0, milestones=(9 / 18, 14 / 18, 17 / 18), clip=True),
    },
    "aqd": {
        4: dict(lr_factor=0.1, milestones=(2 / 3, 8 / 9), clip=False),
        3: dict(lr_factor=0.1, milestones=(2 / 3, 8 / 9), clip=False),
        2: dict(lr_factor=0.2, milestones=(2 / 3, 8 / 9), clip=False),
    },
}
RECIPE_FAMILY = {"lsq": "hqod", "tqt": "hqod", "lsq_torch": "hqod", "lq": "aqd"}
# The embedded dataset's QAT schedule: a fifth of the FP32 schedule's iterations (280 of
# 1,400), so that make demo's two stages fit its 15 minutes.
QAT_ITER_FRACTION = 1 / 5

HQOD_CLASSES = {"RetinaNet": HQODRetinaNet, "FCOS": HQODFCOS, "ATSS": HQODATSS}


def quant_config(method: str, bits: int):
    """A fresh ``quant`` node for one of QAT_METHODS at W``bits``A``bits``."""
    node = copy.deepcopy(quant)
    node.update(QAT_METHODS[method], weight_bits=bits, act_bits=bits)
    return node


def to_qat(train, optimizer, lr_multiplier, quant, *, fp32: str, name: str):
    """Turn the FP32 config's ``train``/``optimizer``/``lr_multiplier`` into QAT fine-tuning
    with ``quant`` from ``output/<fp32>/model_final.pth`` (what ``configs/<fp32>.py`` writes),
    output to ``output/<name>``, in float32: the recipe of :data:`QAT_RECIPES` for the
    quantizer's family and weight bits, a warm-up over 5% of the schedule, zero weight decay on
    quantizer steps."""
    recipe = QAT_RECIPES[RECIPE_FAMILY[quant.method]][quant.weight_bits]
    train.init_checkpoint = f"output/{fp32}/model_final.pth"
    train.amp.enabled = False  # fake quantization trains in float32 (hqod.engine.amp)
    train.output_dir = f"./output/{name}"
    train.max_iter = int(train.max_iter * QAT_ITER_FRACTION)
    train.eval_period = train.max_iter
    train.checkpointer.period = max(train.max_iter // 3, 1)
    optimizer.lr = optimizer.lr * recipe["lr_factor"]
    optimizer.params = copy.deepcopy(qat_optimizer_params)
    if recipe["clip"]:
        optimizer._target_ = ClippedSGD
        optimizer.max_norm = 35.0
    lr_multiplier.update(multistep(recipe["milestones"], warmup=0.05))


def with_hqod(model, train):
    """Add the HQOD losses (TCorr + HIoU, sigma 1.5, gamma 0.8) to the detector: its HQOD
    subclass. Ablations are overrides: ``model.tcorr=False`` (HIoU only), ``model.hiou=False``."""
    base = model._target_.__name__
    model._target_ = HQOD_CLASSES[base]
    model.update(tcorr=True, hiou=True, sigma=1.5, gamma=0.8)
    train.output_dir = train.output_dir + "_hqod"
