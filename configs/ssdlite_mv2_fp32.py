"""FP32 SSD-lite, MobileNetV2 (HQOD's Table II lightweight detector); digits by default
(dataloader.dataset=coco: the 320-px setting)."""
from detectron2.config import LazyCall as L

from hqod.data.ssd_augmentation import DatasetMapperWithBoxes, MinIoURandomCrop, RandomExpand, photometric_distortion
from hqod.modeling import level_shapes

from .common.models.ssdlite import model
from .common.schedules import preset_schedule
from .retina_r18_fp32 import dataloader, lr_multiplier, optimizer, train

model.num_classes = "${hqod_data:${dataloader.dataset},num_classes}"
# SSD-lite's levels and priors from the preset (on COCO and VOC the authors' 320-px setting)
model.backbone.bottom_up.out_features = "${hqod_data:${dataloader.dataset},ssd_in_features}"
model.backbone.in_features = "${hqod_data:${dataloader.dataset},ssd_in_features}"
model.backbone.extra_channels = "${hqod_data:${dataloader.dataset},ssd_extra_channels}"
model.head.input_shape = L(level_shapes)(channels="${hqod_data:${dataloader.dataset},ssd_level_channels}")
model.anchor_generator.strides = "${hqod_data:${dataloader.dataset},ssd_strides}"
model.anchor_generator.min_sizes = "${hqod_data:${dataloader.dataset},ssd_min_sizes}"
model.anchor_generator.max_sizes = "${hqod_data:${dataloader.dataset},ssd_max_sizes}"
# SSD-lite's input sizes from the preset (on COCO and VOC 320 px, not the FPN detectors' 800)
resize_train = dataloader.train.mapper.augmentations[0]
resize_train.short_edge_length = "${hqod_data:${dataloader.dataset},ssd_train_sizes}"
resize_train.max_size = "${hqod_data:${dataloader.dataset},ssd_max_size}"
resize_test = dataloader.test.mapper.augmentations[0]
resize_test.short_edge_length = "${hqod_data:${dataloader.dataset},ssd_test_size}"
resize_test.max_size = "${hqod_data:${dataloader.dataset},ssd_max_size}"
# SSD's augmentation before the resize (photometric distortion, zoom-out, min-IoU crop), with
# the preset's probabilities: on COCO and VOC as the authors train SSD-lite, off on digits
dataloader.train.mapper._target_ = DatasetMapperWithBoxes
dataloader.train.mapper.pre_augmentations = [
    L(photometric_distortion)(prob="${hqod_data:${dataloader.dataset},ssd_photometric_prob}"),
    L(RandomExpand)(prob="${hqod_data:${dataloader.dataset},ssd_expand_prob}", fill=model.pixel_mean),
    L(MinIoURandomCrop)(prob="${hqod_data:${dataloader.dataset},ssd_crop_prob}"),
]
# The lightweight detectors' FP32 schedule (hqod/solver/schedules.py): on digits 3,000 iterations
# (SSD-lite's softmax classifier learns slowly: 3.9 AP at 1,400, 26.8 at 3,000); on COCO and
# VOC the preset's "fp32".
lr_multiplier = preset_schedule(train, optimizer, "fp32_long", lr_multiplier)
# The preset's pretrained MobileNetV2: on digits, output/pretrained/digits_mv2.pth from
# `tools/pretrain_backbone.py --backbone mv2`; on COCO and VOC, output/pretrained/imagenet_mv2.pth.
train.init_checkpoint = "${hqod_backbone:${dataloader.dataset},mv2}"
train.output_dir = "./output/ssdlite_mv2_fp32"
