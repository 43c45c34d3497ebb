#!/usr/bin/env python
"""
Convert torchvision's ImageNet ResNet (18, 34 or 50) or MobileNetV2 into the backbone checkpoint the
COCO and VOC configs start from: the configs' backbone names (detectron2's ResNet, hqod's
MobileNetV2), checked entry by entry against the configs' backbone.

    python tools/convert_torchvision_backbone.py --depth 18 --input resnet18-f37072fd.pth
    # -> output/pretrained/imagenet_r18.pth (the coco/voc presets' backbone_checkpoint)
    python tools/convert_torchvision_backbone.py --backbone mv2 --input mobilenet_v2-b0353104.pth
    # -> output/pretrained/imagenet_mv2.pth (SSD-lite's)

``--input`` is torchvision's weights file (``torch.save`` of a ResNet's ``state_dict()``, as
torchvision publishes them: ``resnet18-f37072fd.pth``, ``resnet34-b627a593.pth``, the V1
``resnet50-0676ba61.pth``, ``mobilenet_v2-b0353104.pth``). Without ``--input`` the file of that name is taken from torch.hub's
checkpoints folder, where ``torchvision.models.resnet18(weights="IMAGENET1K_V1")`` leaves it.
Nothing is downloaded. An existing output is kept (``--force`` to write it again; the old file is
replaced only when the new one is complete).
"""
import argparse
import os
import sys

import hqod  # noqa: F401  (first: quiets detectron2 v0.6 deprecation noise)

from hqod.pretrain import (
    IMAGENET_BACKBONES,
    IMAGENET_DEPTHS,
    TORCHVISION_FILES,
    convert_torchvision_backbone,
    imagenet_backbone_path,
    save_converted_backbone,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--depth", type=int, choices=IMAGENET_DEPTHS, help="ResNet depth (default 18): --backbone r<depth>")
    which.add_argument("--backbone", choices=IMAGENET_BACKBONES, help="r18, r34, r50 or mv2 (MobileNetV2)")
    p.add_argument("--input", default=None, help="torchvision's ResNet weights (default: torch.hub's cached copy)")
    p.add_argument("--output", default=None, help="checkpoint path (default output/pretrained/imagenet_<backbone>.pth)")
    p.add_argument("--force", action="store_true", help="convert again even if the output exists")
    return p.parse_args(argv)


def _default_input(backbone):
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints", TORCHVISION_FILES[backbone])


def main(argv=None):
    args = parse_args(argv)
    backbone = args.backbone or f"r{args.depth or 18}"
    label = "MobileNetV2" if backbone == "mv2" else f"ResNet-{backbone[1:]}"
    output = args.output or imagenet_backbone_path(backbone)
    if os.path.isfile(output) and not args.force:
        print(f"{output} exists; keeping it (--force converts again).")
        return 0
    source = args.input or _default_input(backbone)
    if not os.path.isfile(source):
        print(
            f"error: {source} does not exist: give torchvision's ImageNet {label} weights "
            f"({TORCHVISION_FILES[backbone]}) with --input.",
            file=sys.stderr,
        )
        return 2
    import torch

    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or pickled objects beyond tensors
        print(f"error: {source} cannot be read as a state dict ({str(e).strip().splitlines()[0]}).", file=sys.stderr)
        return 2
    try:
        checkpoint = convert_torchvision_backbone(loaded, backbone)
    except ValueError as e:
        print(f"error: {source}: {e}.", file=sys.stderr)
        return 2
    checkpoint["conversion"]["source"] = os.path.basename(source)
    save_converted_backbone(checkpoint, output)
    print(f"{label}: {len(checkpoint['model'])} entries from {source} -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
