"""PASCAL VOC (XML) → COCO JSON, so that VOC trains and evaluates through COCO's path and metrics
(as HQOD reports VOC results). Used by ``tools/voc2coco.py``."""
import json
import os
import xml.etree.ElementTree as ET

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip


def _parse_xml(path):
    root = ET.parse(path).getroot()
    size = root.find("size")
    width, height = int(size.find("width").text), int(size.find("height").text)
    objects = []
    for obj in root.findall("object"):
        name = obj.find("name").text.strip()
        if name not in VOC_CLASSES:
            raise ValueError(f"{path}: unknown VOC class {name!r}")
        bb = obj.find("bndbox")
        # VOC pixel indices are 1-based and inclusive; COCO boxes are 0-based [x, y, w, h]
        # (the same shift detectron2's own VOC loader makes).
        x0, y0 = float(bb.find("xmin").text) - 1.0, float(bb.find("ymin").text) - 1.0
        x1, y1 = float(bb.find("xmax").text), float(bb.find("ymax").text)
        difficult = obj.find("difficult")
        objects.append(
            {
                "category_id": VOC_CLASSES.index(name) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                # Difficult objects are neither required nor penalized, as in VOC's own metric.
                "iscrowd": int(difficult is not None and difficult.text.strip() == "1"),
            }
        )
    return width, height, objects


def convert_voc_to_coco(devkit_root, splits, out_json):
    """
    Args:
        devkit_root: the ``VOCdevkit`` folder (holding ``VOC2007``, ``VOC2012``).
        splits: ``[(year_folder, image_set), ...]``, e.g. ``[("VOC2007", "trainval"),
            ("VOC2012", "trainval")]``; ids come from ``<year>/ImageSets/Main/<image_set>.txt``.
        out_json: the COCO JSON to write; ``file_name`` is relative to ``devkit_root``.
    Returns:
        (number of images, number of boxes)
    """
    images, annotations = [], []
    for year, image_set in splits:
        ids_file = os.path.join(devkit_root, year, "ImageSets", "Main", f"{image_set}.txt")
        if not os.path.isfile(ids_file):
            raise FileNotFoundError(f"{ids_file} does not exist; is {devkit_root} a VOCdevkit folder?")
        with open(ids_file) as f:
            ids = [line.strip() for line in f if line.strip()]
        for image_name in ids:
            width, height, objects = _parse_xml(
                os.path.join(devkit_root, year, "Annotations", f"{image_name}.xml")
            )
            image_id = len(images) + 1
            images.append(
                {
                    "id": image_id,
                    "file_name": f"{year}/JPEGImages/{image_name}.jpg",
                    "width": width,
                    "height": height,
                }
            )
            for obj in objects:
                w, h = obj["bbox"][2], obj["bbox"][3]
                annotations.append(
                    dict(obj, id=len(annotations) + 1, image_id=image_id, area=w * h)
                )
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(VOC_CLASSES)],
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    with open(out_json, "w") as f:
        json.dump(coco, f)
    return len(images), len(annotations)
