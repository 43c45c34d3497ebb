"""
Dataset registration, by name, under ``$DETECTRON2_DATASETS`` (default ``datasets/``).

- ``digits_train``, ``digits_val``: the embedded dataset (:mod:`hqod.data.digits`), generated on
  demand by :func:`ensure_datasets`.
- ``coco_2017_train``, ``coco_2017_val``: registered by detectron2 itself (``detectron2.data``).
- ``voc_0712_trainval_coco``, ``voc_2007_test_coco``: PASCAL VOC converted to COCO JSON by
  ``tools/voc2coco.py``, so COCO metrics apply (as in HQOD).

All of them go through detectron2's ``register_coco_instances``; ``datasets/README.md`` says where
the real datasets go.
"""
import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .digits import DigitsSpec, generate_split

DIGITS_SPLITS = {"digits_train": "train", "digits_val": "val"}
VOC_SPLITS = {
    "voc_0712_trainval_coco": ("VOC_coco/voc_0712_trainval.json", "VOCdevkit"),
    "voc_2007_test_coco": ("VOC_coco/voc_2007_test.json", "VOCdevkit"),
}


class DatasetError(RuntimeError):
    """A dataset is missing or unreadable; the message says how to fix it."""


def datasets_root():
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def register_all(root=None):
    root = root or datasets_root()
    for name, split in DIGITS_SPLITS.items():
        if name not in DatasetCatalog.list():
            register_coco_instances(
                name,
                {"embedded": True},
                os.path.join(root, "digits", "annotations", f"instances_{split}.json"),
                os.path.join(root, "digits", split),
            )
    for name, (json_file, image_root) in VOC_SPLITS.items():
        if name not in DatasetCatalog.list():
            register_coco_instances(
                name, {}, os.path.join(root, json_file), os.path.join(root, image_root)
            )


def _how_to_fix(name):
    if MetadataCatalog.get(name).get("embedded", False):
        return (
            "Generate it with `python tools/generate_digits.py` (or `make demo`), or delete the "
            "folder and regenerate it if it is corrupt."
        )
    return f"See datasets/README.md for where dataset '{name}' goes and how to prepare it."


def ensure_datasets(names, generate_embedded=True):
    """
    Check that each registered dataset's JSON and image folder exist and the JSON parses; generate
    the embedded dataset when it is missing. Raises :class:`DatasetError` with one clear message.
    """
    if isinstance(names, str):
        names = [names]
    for name in names:
        if name not in DatasetCatalog.list():
            raise DatasetError(
                f"Dataset '{name}' is not registered. Registered datasets include: "
                f"{', '.join(sorted(n for n in DatasetCatalog.list() if not n.startswith('keypoints')))[:600]}"
            )
        meta = MetadataCatalog.get(name)
        json_file, image_root = meta.get("json_file"), meta.get("image_root")
        if json_file is None:
            continue  # not a COCO-JSON dataset: detectron2 reports its own problems
        if not os.path.isfile(json_file) and meta.get("embedded", False) and generate_embedded:
            root = os.path.dirname(os.path.dirname(json_file))
            generate_split(root, DIGITS_SPLITS[name], DigitsSpec())
        if not os.path.isfile(json_file):
            raise DatasetError(
                f"Dataset '{name}': annotation file {json_file} does not exist. {_how_to_fix(name)}"
            )
        if not os.path.isdir(image_root):
            raise DatasetError(
                f"Dataset '{name}': image folder {image_root} does not exist. {_how_to_fix(name)}"
            )
        try:
            with open(json_file) as f:
                data = json.load(f)
            if not {"images", "annotations", "categories"} <= set(data):
                raise ValueError("missing 'images', 'annotations' or 'categories'")
        except (ValueError, OSError) as e:
            raise DatasetError(
                f"Dataset '{name}': {json_file} is not a valid COCO JSON file ({e}). {_how_to_fix(name)}"
            ) from None
