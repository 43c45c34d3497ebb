"""
Detection data for every config: ``dataloader.dataset`` names a preset of hqod.data.presets
(digits, coco, voc) that sets dataset names, class count and image sizes. Digits by default;
``dataloader.dataset=coco`` on the command line switches to COCO 2017.
"""
from omegaconf import OmegaConf

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import DatasetMapper, build_detection_test_loader, get_detection_dataset_dicts

import hqod.data  # noqa: F401  registers the datasets and the hqod_data resolver
# detectron2's train loader with an exactly resumable stream, independent of the process count
from hqod.data.loader import build_detection_train_loader
from hqod.evaluation import COCOEvaluator, HarmonyEvaluator

dataloader = OmegaConf.create()
dataloader.dataset = "digits"

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="${hqod_data:${dataloader.dataset},train}"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(
                short_edge_length="${hqod_data:${dataloader.dataset},train_sizes}",
                sample_style="choice",
                max_size="${hqod_data:${dataloader.dataset},max_size}",
            ),
            L(T.RandomFlip)(prob="${hqod_data:${dataloader.dataset},flip_prob}", horizontal=True),
        ],
        image_format="RGB",
    ),
    total_batch_size="${hqod_data:${dataloader.dataset},batch_size}",
    num_workers=2,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(
        names="${hqod_data:${dataloader.dataset},test}", filter_empty=False
    ),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[
            L(T.ResizeShortestEdge)(
                short_edge_length="${hqod_data:${dataloader.dataset},test_size}",
                max_size="${hqod_data:${dataloader.dataset},max_size}",
            )
        ],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=2,
)

# COCO AP and the score/IoU harmony statistics of the true positives (hqod.evaluation.harmony).
dataloader.evaluator = [
    L(COCOEvaluator)(dataset_name="${...test.dataset.names}"),
    L(HarmonyEvaluator)(dataset_name="${...test.dataset.names}"),
]
