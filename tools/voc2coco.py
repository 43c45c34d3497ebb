#!/usr/bin/env python
"""
Convert PASCAL VOC 07+12 to COCO JSON for the datasets registered as voc_0712_trainval_coco and
voc_2007_test_coco (see datasets/README.md):

    python tools/voc2coco.py --devkit datasets/VOCdevkit --out datasets/VOC_coco
"""
import argparse
import os
import sys

from hqod.data.voc import convert_voc_to_coco

SPLITS = {
    "voc_0712_trainval.json": [("VOC2007", "trainval"), ("VOC2012", "trainval")],
    "voc_2007_test.json": [("VOC2007", "test")],
}


def main(argv=None):
    parser = argparse.ArgumentParser(description="PASCAL VOC XML -> COCO JSON")
    parser.add_argument("--devkit", default="datasets/VOCdevkit", help="the VOCdevkit folder")
    parser.add_argument("--out", default="datasets/VOC_coco", help="output folder for the JSON files")
    args = parser.parse_args(argv)
    try:
        for name, splits in SPLITS.items():
            n_img, n_box = convert_voc_to_coco(args.devkit, splits, os.path.join(args.out, name))
            print(f"{name}: {n_img} images, {n_box} boxes")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
