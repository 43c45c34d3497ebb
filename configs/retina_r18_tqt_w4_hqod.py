"""RetinaNet-R18, TQT W4A4 + HQOD (TCorr + HIoU)."""
from .common.qat import with_hqod
from .retina_r18_tqt_w4 import dataloader, lr_multiplier, model, optimizer, quant, train

with_hqod(model, train)
