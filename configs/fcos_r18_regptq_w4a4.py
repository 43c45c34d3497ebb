"""FCOS-R18, post-training quantization W4A4 by Reg-PTQ (tools/ptq.py), from
configs/fcos_r18_fp32.py's detector."""
from .common.ptq import ptq_config, to_ptq
from .fcos_r18_lsq_w4 import dataloader, lr_multiplier, model, optimizer, quant, train

ptq = ptq_config("regptq")
to_ptq(train, quant, name="fcos_r18_regptq_w4a4")
