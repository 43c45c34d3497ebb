"""FCOS-R50, AQD* (convs only) W4A4 + HQOD (TCorr + HIoU)."""
from .common.qat import with_hqod
from .fcos_r50_aqdstar_w4 import dataloader, lr_multiplier, model, optimizer, quant, train

with_hqod(model, train)
