"""FP32 FCOS, ResNet-18 + FPN, BN everywhere; digits by default (dataloader.dataset=coco)."""
from .common.models.fcos import model
from .retina_r18_fp32 import dataloader, lr_multiplier, optimizer, train

model.num_classes = "${hqod_data:${dataloader.dataset},num_classes}"
model.backbone.out_channels = "${hqod_data:${dataloader.dataset},fpn_channels}"
train.output_dir = "./output/fcos_r18_fp32"
# float32: fvcore's GIoU loss (FCOS/ATSS box loss) fails on bfloat16 boxes under autocast
train.amp.enabled = False
