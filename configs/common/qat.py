"""
What every QAT config of the matrix ``configs/<det>_<backbone>_<qat>_w<bits>[_hqod].py`` shares:
the QAT methods (``QAT_METHODS``), fine-tuning from the FP32 detector (:func:`to_qat`) and the
HQOD switch (:func:`with_hqod`). A matrix file is a few lines over these, e.g.::

    from .common.qat import quant_config, to_qat
    from .retina_r18_fp32 import dataloader, lr_multiplier, model, optimizer, train

    quant = quant_config("aqd", bits=2)
    to_qat(train, optimizer, fp32="retina_r18_fp32", bits=2)
"""
import copy

from hqod.modeling import HQODATSS, HQODFCOS, HQODRetinaNet

from .quant import qat_optimizer_params, quant

# name in the config file -> fields of the quant node (configs/common/quant.py documents them).
# Every method uses multi-level BN in the head (one BN per FPN level, indexed by level).
QAT_METHODS = {
    "lsq": dict(method="lsq", scope="aqd_star"),  # LSQ (HQOD Eq. 2-3), convs quantized
    "tqt": dict(method="tqt", scope="aqd_star"),  # TQT: power-of-two steps, convs quantized
    "aqdstar": dict(method="lq", scope="aqd_star"),  # AQD*: AQD's quantizer, convs quantized
    "aqd": dict(method="lq", scope="aqd"),  # AQD: also BN outputs, residual and FPN adds
}

# Fine-tuning learning rate by bit width, relative to the FP32 one. The papers fine-tune at
# 1/10 of the FP32 rate for 4 bits and use a larger rate for 2 bits (AQD: 2e-3; HQOD: 1e-2).
LR_FACTOR = {2: 0.25, 3: 0.1, 4: 0.1}
# The embedded dataset's QAT schedule: a third of the FP32 schedule's iterations.
QAT_ITER_FRACTION = 1 / 3

HQOD_CLASSES = {"RetinaNet": HQODRetinaNet, "FCOS": HQODFCOS, "ATSS": HQODATSS}


def quant_config(method: str, bits: int):
    """A fresh ``quant`` node for one of QAT_METHODS at W``bits``A``bits``."""
    node = copy.deepcopy(quant)
    node.update(QAT_METHODS[method], weight_bits=bits, act_bits=bits)
    return node


def to_qat(train, optimizer, *, fp32: str, bits: int, name: str):
    """Turn the FP32 config's ``train``/``optimizer`` into QAT fine-tuning from
    ``output/<fp32>/model_final.pth`` (what ``configs/<fp32>.py`` writes), output to
    ``output/<name>``; zero weight decay on quantizer steps."""
    train.init_checkpoint = f"output/{fp32}/model_final.pth"
    train.output_dir = f"./output/{name}"
    train.max_iter = int(train.max_iter * QAT_ITER_FRACTION)
    train.eval_period = train.max_iter
    train.checkpointer.period = max(train.max_iter // 3, 1)
    optimizer.lr = optimizer.lr * LR_FACTOR[bits]
    optimizer.params = copy.deepcopy(qat_optimizer_params)


def with_hqod(model, train):
    """Add the HQOD losses (TCorr + HIoU, sigma 1.5, gamma 0.8) to the detector: its HQOD
    subclass. Ablations are overrides: ``model.tcorr=False`` (HIoU only), ``model.hiou=False``."""
    base = model._target_.__name__
    model._target_ = HQOD_CLASSES[base]
    model.update(tcorr=True, hiou=True, sigma=1.5, gamma=0.8)
    train.output_dir = train.output_dir + "_hqod"
