"""ATSS-R18, TQT W3A3 + HQOD (TCorr + HIoU)."""
from .common.qat import with_hqod
from .atss_r18_tqt_w3 import dataloader, lr_multiplier, model, optimizer, quant, train

with_hqod(model, train)
