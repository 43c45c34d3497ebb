"""FP32 FCOS, ResNet-18 + FPN, BN everywhere; digits by default (dataloader.dataset=coco)."""
from .common.data.detection import dataloader
from .common.models.fcos import model
from .common.optim import SGD as optimizer
from .common.schedules import lr_multiplier_short as lr_multiplier
from .common.train import train

model.num_classes = "${hqod_data:${dataloader.dataset},num_classes}"
train.max_iter = 1500
train.eval_period = 1500
train.checkpointer.period = 500
train.output_dir = "./output/fcos_r18_fp32"
