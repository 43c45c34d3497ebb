"""SSD-lite MobileNetV2, TQT W4A4 (power-of-two steps; stem conv and the per-level predictors at
8 bits; depthwise convs at W4A4), fine-tuned from configs/ssdlite_mv2_fp32.py."""
from .common.qat import quant_config, to_qat
from .ssdlite_mv2_fp32 import dataloader, lr_multiplier, model, optimizer, train

quant = quant_config("tqt", bits=4)
to_qat(train, optimizer, lr_multiplier, quant, fp32="ssdlite_mv2_fp32", name="ssdlite_mv2_tqt_w4")
