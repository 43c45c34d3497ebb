"""SSD-lite MobileNetV2, LSQ W2A2, fine-tuned from configs/ssdlite_mv2_fp32.py (stem conv and
the per-level predictors at 8 bits; depthwise convs at W2A2)."""
from .common.qat import quant_config, to_qat
from .ssdlite_mv2_fp32 import dataloader, lr_multiplier, model, optimizer, train

quant = quant_config("lsq", bits=2)
to_qat(train, optimizer, lr_multiplier, quant, fp32="ssdlite_mv2_fp32", name="ssdlite_mv2_lsq_w2")
