"""SSD-lite MobileNetV2, LSQ W2A2 + HQOD (TCorr + HIoU; p = softmax score of the ground-truth class)."""
from .common.qat import with_hqod
from .ssdlite_mv2_lsq_w2 import dataloader, lr_multiplier, model, optimizer, quant, train

with_hqod(model, train)
