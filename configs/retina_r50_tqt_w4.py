"""RetinaNet-R50, TQT W4A4, fine-tuned from configs/retina_r50_fp32.py."""
from .common.qat import quant_config, to_qat
from .retina_r50_fp32 import dataloader, lr_multiplier, model, optimizer, train

quant = quant_config("tqt", bits=4)
to_qat(train, optimizer, lr_multiplier, quant, fp32="retina_r50_fp32", name="retina_r50_tqt_w4")
