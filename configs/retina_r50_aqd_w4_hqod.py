"""RetinaNet-R50, AQD (fully quantized) W4A4 + HQOD (TCorr + HIoU)."""
from .common.qat import with_hqod
from .retina_r50_aqd_w4 import dataloader, lr_multiplier, model, optimizer, quant, train

with_hqod(model, train)
