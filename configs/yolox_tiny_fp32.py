"""FP32 YOLOX-tiny, CSPDarknet (HQOD's Table II lightweight detector); digits by default
(dataloader.dataset=coco: its 320-640 px training, 416 px test)."""
from .common.models.yolox import model
from .common.schedules import preset_schedule
from .retina_r18_fp32 import dataloader, lr_multiplier, optimizer, train

model.num_classes = "${hqod_data:${dataloader.dataset},num_classes}"
resize_train = dataloader.train.mapper.augmentations[0]
resize_train.short_edge_length = "${hqod_data:${dataloader.dataset},yolox_train_sizes}"
resize_train.max_size = "${hqod_data:${dataloader.dataset},yolox_max_size}"
resize_test = dataloader.test.mapper.augmentations[0]
resize_test.short_edge_length = "${hqod_data:${dataloader.dataset},yolox_test_size}"
resize_test.max_size = "${hqod_data:${dataloader.dataset},yolox_max_size}"
# The lightweight detectors' FP32 schedule (hqod/solver/schedules.py): on digits 3,000 iterations
# (YOLOX-tiny: 20.8 AP at 1,400, 44.1 at 3,000); on COCO and VOC the preset's "fp32".
lr_multiplier = preset_schedule(train, optimizer, "fp32_long", lr_multiplier)
# On digits the CSPDarknet of `tools/pretrain_backbone.py --backbone csp_tiny`; on COCO and VOC
# none: YOLOX trains from scratch (its authors' 300-epoch recipe with Mosaic is not ours: the
# preset's FP32 schedule applies, without Mosaic).
train.init_checkpoint = "${hqod_backbone:${dataloader.dataset},csp_tiny}"
train.output_dir = "./output/yolox_tiny_fp32"
