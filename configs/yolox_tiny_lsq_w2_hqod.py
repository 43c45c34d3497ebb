"""YOLOX-tiny, LSQ W2A2 + HQOD (TCorr + HIoU on SimOTA's positives; p = sigmoid of the
ground-truth class's logit, objectness not multiplied in)."""
from .common.qat import with_hqod
from .yolox_tiny_lsq_w2 import dataloader, lr_multiplier, model, optimizer, quant, train

with_hqod(model, train)
