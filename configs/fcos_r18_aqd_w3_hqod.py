"""FCOS-R18, AQD (fully quantized) W3A3 + HQOD (TCorr + HIoU)."""
from .common.qat import with_hqod
from .fcos_r18_aqd_w3 import dataloader, lr_multiplier, model, optimizer, quant, train

with_hqod(model, train)
