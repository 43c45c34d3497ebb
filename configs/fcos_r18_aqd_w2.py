"""FCOS-R18, AQD (fully quantized) W2A2, fine-tuned from configs/fcos_r18_fp32.py."""
from .common.qat import quant_config, to_qat
from .fcos_r18_fp32 import dataloader, lr_multiplier, model, optimizer, train

quant = quant_config("aqd", bits=2)
to_qat(train, optimizer, lr_multiplier, quant, fp32="fcos_r18_fp32", name="fcos_r18_aqd_w2")
