"""The PTQ pipeline: model preparation (shared with ``hqod.engine.build_model``), calibration
images, and the run of one method."""
import copy
import logging
import random
import time
from dataclasses import replace

import torch
from torch import nn

from detectron2.config import instantiate

from hqod.quantization import QuantConfig, calibrate, quantize_model

from .config import PTQConfig
from .fold import fold_batch_norms
from .llaq import use_llaq
from .reconstruct import reconstruct

__all__ = ["prepare_model", "calibration_batches", "run_ptq"]

logger = logging.getLogger(__name__)


def prepare_model(model: nn.Module, cfg_quant, cfg_ptq) -> nn.Module:
    """The structure PTQ calibrates, from an FP32 detector, in place: BN folded
    (``ptq.fold_bn``), quantized by ``cfg_quant`` with the method's observer, LLAQ on the
    regression branch (``ptq.head_quantizer``)."""
    ptq = PTQConfig.from_cfg(cfg_ptq).resolved()
    qcfg = QuantConfig.from_cfg(cfg_quant)
    if ptq.fold_bn and qcfg.scope == "aqd":
        raise ValueError(
            "ptq.fold_bn=True with quant.scope='aqd': AQD keeps BN as its integer BN. Set "
            "ptq.fold_bn=False for scope aqd, or quant.scope='aqd_star'."
        )
    if ptq.reconstruct and qcfg.method == "lq":
        raise ValueError(
            f"ptq.method={ptq.method!r} rounds weights on a grid with a zero level; AQD's LQ "
            "signed grid has none. Use quant.method='lsq' or 'tqt'."
        )
    if ptq.fold_bn:
        fold_batch_norms(model)
    model = quantize_model(model, replace(qcfg, step_init=ptq.step_init))
    if ptq.head_quantizer == "llaq":
        use_llaq(model, ptq.llaq_layers)
    return model


def calibration_batches(cfg, num_images: int, batch_size: int, seed: int):
    """``num_images`` images of the **training** split (``dataloader.train.dataset``), drawn
    with ``seed``, through the test-time mapper (fixed resize, no flip) with their boxes kept
    (BRECQ's Fisher weights need a detection loss); in batches of ``batch_size``."""
    dicts = instantiate(cfg.dataloader.train.dataset)
    if len(dicts) < num_images:
        raise ValueError(
            f"ptq.calib_images={num_images} but the training split has {len(dicts)} images; "
            f"set ptq.calib_images={len(dicts)} or fewer."
        )
    picked = random.Random(seed).sample(range(len(dicts)), num_images)
    mapper_cfg = copy.deepcopy(cfg.dataloader.test.mapper)
    mapper_cfg.is_train = True
    mapper = instantiate(mapper_cfg)
    images = [mapper(copy.deepcopy(dicts[i])) for i in picked]
    return [images[i : i + batch_size] for i in range(0, len(images), batch_size)]


def run_ptq(cfg, fp32_model: nn.Module):
    """Quantize ``fp32_model`` (the loaded FP32 detector, left unchanged) by ``cfg.quant`` and
    calibrate it by ``cfg.ptq``; returns ``(quantized model, reconstruction report, seconds)``."""
    ptq = PTQConfig.from_cfg(cfg.ptq).resolved()
    start = time.perf_counter()
    fp = copy.deepcopy(fp32_model).eval()
    if ptq.fold_bn:
        fold_batch_norms(fp)
    model = prepare_model(copy.deepcopy(fp), cfg.quant, cfg.ptq)
    batches = calibration_batches(cfg, ptq.calib_images, ptq.batch_size, ptq.seed)
    with torch.no_grad():
        calibrate(model, batches, min(ptq.init_images, ptq.calib_images))
    report = []
    if ptq.reconstruct:
        report = reconstruct(model, fp, batches, ptq)
    model.eval()
    seconds = time.perf_counter() - start
    logger.info(f"PTQ {ptq.method} on {ptq.calib_images} training images in {seconds:.1f}s.")
    return model, report, seconds
