#!/usr/bin/env python
"""
How well a detector's anchors (SSD's priors) cover the training boxes: per box size, the IoU of
each box's best anchor, the share of boxes whose best anchor is under the matcher's positive
threshold (trained only through the one forced match) and the positives per box. The images
come from the config's training loader (its resizing and augmentation); the model is built from
the config, untrained: only its feature-map sizes and anchors matter.

    python tools/analyze_anchors.py --config-file configs/ssdlite_mv2_fp32.py --images 120
    python tools/analyze_anchors.py --config-file configs/ssdlite_mv2_fp32.py dataloader.dataset=coco

For detectors with an IoU anchor matcher (RetinaNet, SSD-lite); FCOS, ATSS and YOLOX assign
their samples otherwise.
"""
import argparse
import itertools

import hqod  # noqa: F401  (first: quiets detectron2 v0.6 deprecation noise)

from detectron2.config import instantiate

from hqod.engine import UserError, build_model, load_config, run_tool
from hqod.evaluation.anchor_coverage import anchor_coverage, coverage_table, positive_threshold


def main(args):
    cfg = load_config(args.config_file, args.opts)
    model = build_model(cfg).eval()
    if not hasattr(model, "anchor_matcher") or not hasattr(model, "anchor_generator"):
        raise UserError(
            f"{type(model).__name__} has no IoU anchor matcher (anchor_matcher, anchor_generator): "
            "this tool analyses anchor-based detectors such as RetinaNet and SSD-lite."
        )
    cfg.dataloader.train.seed = args.seed  # the loader's stream: the same images for every config
    loader = instantiate(cfg.dataloader.train)
    batch_size = cfg.dataloader.train.total_batch_size
    batches = itertools.islice(loader, -(-args.images // batch_size))
    coverage = anchor_coverage(model, batches)
    table = coverage_table(coverage, positive_threshold(model))
    print(f"{args.config_file} {' '.join(args.opts)}: {len(coverage['size'])} training boxes\n{table}")
    return coverage


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--images", type=int, default=120, help="training images to analyse (whole batches)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training loader's image stream and augmentation")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, key=value")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_tool(main, parse_args())
