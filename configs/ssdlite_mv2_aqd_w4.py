"""SSD-lite MobileNetV2, AQD W4A4 (AQD's quantizer; BN outputs and the inverted residual adds
on 8-bit integer grids, integer-aware: AQD Eq. 4-8), fine-tuned from configs/ssdlite_mv2_fp32.py
with AQD's recipe. ``tools/export_integer.py`` (the integer-only engine) and
``tools/export_onnx.py`` take this scope."""
from .common.qat import quant_config, to_qat
from .ssdlite_mv2_fp32 import dataloader, lr_multiplier, model, optimizer, train

quant = quant_config("aqd", bits=4)
to_qat(train, optimizer, lr_multiplier, quant, fp32="ssdlite_mv2_fp32", name="ssdlite_mv2_aqd_w4")
