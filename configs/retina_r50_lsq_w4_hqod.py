"""RetinaNet-R50, LSQ W4A4 + HQOD (TCorr + HIoU)."""
from .common.qat import with_hqod
from .retina_r50_lsq_w4 import dataloader, lr_multiplier, model, optimizer, quant, train

with_hqod(model, train)
