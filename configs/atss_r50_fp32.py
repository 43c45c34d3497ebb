"""FP32 ATSS, ResNet-50 + FPN (torchvision-style stride in the 3x3 conv)."""
from .atss_r18_fp32 import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.depth = 50
train.output_dir = "./output/atss_r50_fp32"
