"""RetinaNet-R18, LSQ W3A3, fine-tuned from configs/retina_r18_fp32.py."""
from .common.qat import quant_config, to_qat
from .retina_r18_fp32 import dataloader, lr_multiplier, model, optimizer, train

quant = quant_config("lsq", bits=3)
to_qat(train, optimizer, lr_multiplier, quant, fp32="retina_r18_fp32", name="retina_r18_lsq_w3")
