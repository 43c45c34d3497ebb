"""YOLOX-tiny, LSQ W2A2, fine-tuned from configs/yolox_tiny_fp32.py (the Focus stem conv and the
nine predictors at 8 bits)."""
from .common.qat import quant_config, to_qat
from .yolox_tiny_fp32 import dataloader, lr_multiplier, model, optimizer, train

quant = quant_config("lsq", bits=2)
to_qat(train, optimizer, lr_multiplier, quant, fp32="yolox_tiny_fp32", name="yolox_tiny_lsq_w2")
