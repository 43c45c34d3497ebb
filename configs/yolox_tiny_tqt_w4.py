"""YOLOX-tiny, TQT W4A4 (power-of-two steps; the Focus stem conv and the nine predictors at 8
bits), fine-tuned from configs/yolox_tiny_fp32.py. (AQD's scope does not apply: its integer BN
outputs and adds need ReLU-family activations, YOLOX uses SiLU.)"""
from .common.qat import quant_config, to_qat
from .yolox_tiny_fp32 import dataloader, lr_multiplier, model, optimizer, train

quant = quant_config("tqt", bits=4)
to_qat(train, optimizer, lr_multiplier, quant, fp32="yolox_tiny_fp32", name="yolox_tiny_tqt_w4")
