"""RetinaNet-R18, LSQ W2A2 + HarDet* (HQOD's Table III baseline)."""
from .common.qat import with_hardet
from .retina_r18_lsq_w2 import dataloader, lr_multiplier, model, optimizer, quant, train

with_hardet(model, train)
