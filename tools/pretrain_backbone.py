#!/usr/bin/env python
"""
Pretrain a detector backbone on the embedded dataset (the stand-in for ImageNet pretraining):
detectron2's ResNet of the given depth, SSD-lite's MobileNetV2 or YOLOX-tiny's CSPDarknet, trained
as an 11-way classifier (10 digits + background)
on crops drawn like the digits scenes from the train split's digit samples only, written as a
backbone checkpoint that ``train.init_checkpoint`` loads as it loads an ImageNet one.

    python tools/pretrain_backbone.py --depth 18         # -> output/pretrained/digits_r18.pth
    python tools/pretrain_backbone.py --backbone mv2     # -> output/pretrained/digits_mv2.pth
    python tools/pretrain_backbone.py --backbone csp_tiny  # -> output/pretrained/digits_csp_tiny.pth

The digits configs use that file by default. An existing checkpoint is kept (``--force`` to
train a new one; the old file is replaced only when the new one is complete).
"""
import argparse
import json
import os
import sys

import hqod  # noqa: F401  (first: quiets detectron2 v0.6 deprecation noise)
from detectron2.utils.logger import setup_logger

from hqod.pretrain import (
    DEFAULT_PRETRAIN_SCHEDULE,
    PRETRAIN_BACKBONES,
    PRETRAIN_DEPTHS,
    PRETRAIN_SCHEDULES,
    pretrain_backbone,
    pretrain_schedule,
    pretrained_backbone_path,
    save_backbone_checkpoint,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--depth", type=int, choices=PRETRAIN_DEPTHS, help="ResNet depth (default 18): --backbone r<depth>")
    which.add_argument("--backbone", choices=PRETRAIN_BACKBONES, help="r18, r34, r50, mv2 (MobileNetV2, SSD-lite's) or csp_tiny (CSPDarknet, YOLOX-tiny's)")
    p.add_argument("--output", default=None, help="checkpoint path (default output/pretrained/digits_<backbone>.pth)")
    special = "; ".join(f"{b}: {n} crops, {e} epochs" for b, (n, e) in PRETRAIN_SCHEDULES.items())
    p.add_argument("--crops", type=int, default=None, help=f"training crops (default {DEFAULT_PRETRAIN_SCHEDULE[0]}; {special})")
    p.add_argument("--epochs", type=int, default=None, help=f"passes over the crops (default {DEFAULT_PRETRAIN_SCHEDULE[1]}; {special})")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    p.add_argument("--crop-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="crop-making processes (default 2)")
    p.add_argument("--force", action="store_true", help="train again even if the checkpoint exists")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="hqod", abbrev_name="hqod")
    backbone = args.backbone or f"r{args.depth or 18}"
    output = args.output or pretrained_backbone_path(backbone)
    if os.path.isfile(output) and not args.force:
        print(f"{output} exists; keeping it (--force trains a new one).")
        return 0
    args.crops, args.epochs = pretrain_schedule(backbone, args.crops, args.epochs)
    if args.epochs < 1 or args.batch_size < 1 or args.crops < args.batch_size or args.crop_size < 32:
        print("error: --epochs and --batch-size must be >= 1, --crops >= --batch-size, --crop-size >= 32", file=sys.stderr)
        return 2
    model, info = pretrain_backbone(
        backbone=backbone,
        num_crops=args.crops,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        crop_size=args.crop_size,
        seed=args.seed,
        num_workers=args.workers,
    )
    save_backbone_checkpoint(model, info, output)
    print(json.dumps({k: info[k] for k in ("backbone", "top1_holdout", "top1_fit_last", "seconds")}))
    print(
        f"{backbone} pretrained in {info['seconds']:.0f} s: top-1 {info['top1_holdout']:.1f}% on "
        f"held-out crops (digit samples it never saw) -> {output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
