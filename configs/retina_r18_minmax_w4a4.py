"""RetinaNet-R18, post-training quantization W4A4 by minmax (tools/ptq.py), from
configs/retina_r18_fp32.py's detector; other bits: quant.weight_bits=2 quant.act_bits=4."""
from .common.ptq import ptq_config, to_ptq
from .retina_r18_lsq_w4 import dataloader, lr_multiplier, model, optimizer, quant, train

ptq = ptq_config("minmax")
to_ptq(train, quant, name="retina_r18_minmax_w4a4")
