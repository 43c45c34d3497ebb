"""FP32 RetinaNet, ResNet-18 + FPN, BN everywhere; digits by default (dataloader.dataset=coco)."""
from .common.data.detection import dataloader
from .common.models.retinanet import model
from .common.optim import SGD as optimizer
from .common.schedules import preset_schedule
from .common.train import train

model.num_classes = "${hqod_data:${dataloader.dataset},num_classes}"
model.backbone.out_channels = "${hqod_data:${dataloader.dataset},fpn_channels}"
# The preset's pretrained backbone for this depth: on digits, output/pretrained/digits_r18.pth from
# tools/pretrain_backbone.py (the stand-in for ImageNet pretraining); on COCO and VOC,
# output/pretrained/imagenet_r18.pth from tools/convert_torchvision_backbone.py.
train.init_checkpoint = "${hqod_backbone:${dataloader.dataset},${model.backbone.bottom_up.stages.depth}}"
# The preset's FP32 schedule (hqod/solver/schedules.py): on digits 1,400 iterations of 4 images
# (2.8 epochs), about 6 minutes on 2 CPU cores with bfloat16 autocast; on COCO detectron2's 1x
# (90k iterations of 16 images, lr 0.01, x0.1 at 60k and 80k, 1k warm-up); VOC 12 epochs.
lr_multiplier = preset_schedule(train, optimizer, "fp32")
# Mixed precision (hqod.engine.amp): bfloat16 autocast on CPUs that compute it natively (1.7x
# faster here, same AP within seed noise), float16 on CUDA; evaluation and QAT run in float32.
train.amp.enabled = True
train.output_dir = "./output/retina_r18_fp32"
