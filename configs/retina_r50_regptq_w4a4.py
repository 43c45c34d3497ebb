"""RetinaNet-R50, post-training quantization W4A4 by regptq (tools/ptq.py), from
configs/retina_r50_fp32.py's detector: Reg-PTQ's RetinaNet row (README, "Reproducing the papers")."""
from .common.ptq import ptq_config, to_ptq
from .retina_r50_lsq_w4 import dataloader, lr_multiplier, model, optimizer, quant, train

ptq = ptq_config("regptq")
to_ptq(train, quant, name="retina_r50_regptq_w4a4")
