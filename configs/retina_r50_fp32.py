"""FP32 RetinaNet, ResNet-50 + FPN (torchvision-style stride in the 3x3 conv)."""
from .retina_r18_fp32 import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.depth = 50
train.output_dir = "./output/retina_r50_fp32"
