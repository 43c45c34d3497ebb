"""YOLOX-tiny, TQT W4A4 + HQOD (TCorr + HIoU on SimOTA's positives; p = sigmoid of the
ground-truth class's logit, objectness not multiplied in)."""
from .common.qat import with_hqod
from .yolox_tiny_tqt_w4 import dataloader, lr_multiplier, model, optimizer, quant, train

with_hqod(model, train)
