"""SSD-lite MobileNetV2, TQT W4A4 + HQOD (TCorr + HIoU; p = softmax score of the ground-truth class)."""
from .common.qat import with_hqod
from .ssdlite_mv2_tqt_w4 import dataloader, lr_multiplier, model, optimizer, quant, train

with_hqod(model, train)
