"""ATSS-R50, AQD* (convs only) W2A2 + HQOD (TCorr + HIoU)."""
from .common.qat import with_hqod
from .atss_r50_aqdstar_w2 import dataloader, lr_multiplier, model, optimizer, quant, train

with_hqod(model, train)
