"""SSD-lite MobileNetV2, AQD W4A4 + HQOD (TCorr + HIoU; p = softmax score of the ground-truth class)."""
from .common.qat import with_hqod
from .ssdlite_mv2_aqd_w4 import dataloader, lr_multiplier, model, optimizer, quant, train

with_hqod(model, train)
