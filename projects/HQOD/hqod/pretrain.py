"""
Backbone pretraining on the embedded dataset: the stand-in for an ImageNet-pretrained backbone.

A detector's backbone (detectron2's ResNet, SSD-lite's MobileNetV2 or YOLOX-tiny's CSPDarknet,
built exactly as the detector configs build it) is trained as an 11-way classifier on the crops
of :mod:`hqod.data.digit_crops` (train-split digit samples only), and saved as a backbone
checkpoint that ``train.init_checkpoint`` loads the way it loads an ImageNet one: the backbone's
own names (``stem.conv1.weight``, ``res2.0.conv1...``) matched into ``backbone.bottom_up`` by
detectron2's name-matching heuristics. The digits presets
point ``train.init_checkpoint`` at :func:`pretrained_backbone_path`.
"""
import logging
import math
import multiprocessing
import os
import time
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.modeling.backbone import BasicStem, ResNet

from .data.digit_crops import NUM_CROP_CLASSES, make_crops
from .data.presets import backbone_checkpoint, backbone_name
from .modeling.backbone import resnet_stages
from .modeling.cspdarknet import CSPDarknet
from .modeling.mobilenet import MobileNetV2

__all__ = [
    "BackboneClassifier",
    "convert_command",
    "convert_torchvision_backbone",
    "crop_set",
    "imagenet_backbone_path",
    "IMAGENET_BACKBONES",
    "IMAGENET_DEPTHS",
    "TORCHVISION_FILES",
    "pretrain_backbone",
    "pretrain_command",
    "pretrained_backbone_path",
    "PRETRAIN_BACKBONES",
    "PRETRAIN_DEPTHS",
    "pretrain_schedule",
    "PRETRAIN_SCHEDULES",
    "DEFAULT_PRETRAIN_SCHEDULE",
    "save_converted_backbone",
]

logger = logging.getLogger("hqod")

# The detector configs' input normalization (configs/common/models/retinanet.py): torchvision's
# RGB mean/std; the classifier normalizes its crops the same way.
PIXEL_MEAN = (123.675, 116.280, 103.530)
PIXEL_STD = (58.395, 57.120, 57.375)


# The ResNet depths tools/pretrain_backbone.py trains, and every backbone it trains (``--backbone``).
PRETRAIN_DEPTHS = (18, 34, 50)
PRETRAIN_BACKBONES = tuple(f"r{d}" for d in PRETRAIN_DEPTHS) + ("mv2", "csp_tiny")
# Training crops and passes over them per backbone (tools/pretrain_backbone.py's defaults).
# MobileNetV2 learns slower per step than the ResNets: 2 passes over 25,600 crops left it at
# 50.9 % top-1 and still rising, too weak for SSD-lite's light head (BENCHMARKS.md, issue 18).
PRETRAIN_SCHEDULES = {"mv2": (51200, 3)}
DEFAULT_PRETRAIN_SCHEDULE = (25600, 2)


def pretrain_schedule(backbone, crops: Optional[int] = None, epochs: Optional[int] = None) -> Tuple[int, int]:
    """``(crops, epochs)`` to train ``backbone`` with: those given, else its default."""
    default_crops, default_epochs = PRETRAIN_SCHEDULES.get(backbone_name(backbone), DEFAULT_PRETRAIN_SCHEDULE)
    return (default_crops if crops is None else crops), (default_epochs if epochs is None else epochs)


def pretrained_backbone_path(backbone) -> str:
    """Where ``tools/pretrain_backbone.py`` writes the checkpoint of ``backbone`` (a ResNet depth,
    or ``mv2``) and the digits configs look for it (the digits preset's ``backbone_checkpoint``):
    ``output/pretrained/digits_r<D>.pth``, ``output/pretrained/digits_mv2.pth``."""
    return backbone_checkpoint("digits", backbone)


def pretrain_command(backbone) -> str:
    """The command that makes :func:`pretrained_backbone_path` (``backbone``)."""
    name = backbone_name(backbone)
    return "python tools/pretrain_backbone.py " + (f"--depth {name[1:]}" if name.startswith("r") else f"--backbone {name}")


# ImageNet backbones for COCO and VOC: torchvision's ImageNet ResNets (the V1 weights, which
# MMDetection's "torchvision://resnet50" and the papers' detectors start from), renamed to
# detectron2's ResNet keys by tools/convert_torchvision_backbone.py. The file names torchvision
# gives them (torch.hub's checkpoints folder keeps them under these names):
TORCHVISION_FILES = {
    "r18": "resnet18-f37072fd.pth", "r34": "resnet34-b627a593.pth", "r50": "resnet50-0676ba61.pth",
    "mv2": "mobilenet_v2-b0353104.pth",
}
IMAGENET_DEPTHS = (18, 34, 50)
IMAGENET_BACKBONES = tuple(TORCHVISION_FILES)


def imagenet_backbone_path(backbone) -> str:
    """Where ``tools/convert_torchvision_backbone.py`` writes the checkpoint of ``backbone`` (a
    ResNet depth, or ``mv2``) and the COCO and VOC configs look for it (their preset's
    ``backbone_checkpoint``): ``output/pretrained/imagenet_r<D>.pth``, ``imagenet_mv2.pth``."""
    return backbone_checkpoint("coco", backbone)


def convert_command(backbone) -> str:
    """The command that makes :func:`imagenet_backbone_path` (``backbone``)."""
    name = backbone_name(backbone)
    which = f"--depth {name[1:]}" if name.startswith("r") else f"--backbone {name}"
    source = TORCHVISION_FILES.get(name, f"resnet{name[1:]}.pth")
    return f"python tools/convert_torchvision_backbone.py {which} --input {source}"


def convert_torchvision_backbone(state_dict, backbone) -> dict:
    """
    torchvision's ResNet-``depth`` or MobileNetV2 (``backbone``: a depth or ``mv2``) state dict
    (``torchvision.models.resnet*().state_dict()``, ``mobilenet_v2().state_dict()``, or a
    checkpoint holding it under ``state_dict`` / ``model``, ``module.`` prefixes allowed) -> a
    backbone checkpoint in the names of the configs' backbone (detectron2's ResNet:
    ``stem.conv1.weight``, ``res2.0.conv1.norm.running_mean``, ..., the renaming of
    :func:`hqod.engine.checkpoint.torchvision_resnet_to_d2`; MobileNetV2: that of
    :func:`hqod.engine.checkpoint.torchvision_mobilenet_v2_to_ours`), which
    ``train.init_checkpoint`` loads into ``backbone.bottom_up`` by name matching. Checked entry by
    entry against the backbone as the configs build it: every entry present with its shape
    (``num_batches_tracked`` may be absent, as in old torchvision files), nothing left over but
    the classifier. A mismatch raises ValueError naming it.
    """
    from .engine.checkpoint import torchvision_mobilenet_v2_to_ours, torchvision_resnet_to_d2

    name = backbone_name(backbone)
    for key in ("state_dict", "model"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError("not a state dict (a dict of tensors)")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if name == "mv2":
        if "features.0.0.weight" not in state:
            raise ValueError(
                f"not a torchvision MobileNetV2 state dict (no features.0.0.weight; keys such as "
                f"{', '.join(sorted(state)[:3])})"
            )
        converted = torchvision_mobilenet_v2_to_ours(state)
        reference = MobileNetV2(out_features=["conv_last"]).state_dict()
        return _checked_conversion(converted, reference, "hqod's MobileNetV2", {"backbone": name})
    if "conv1.weight" not in state or not any(k.startswith("layer1.") for k in state):
        raise ValueError(
            f"not a torchvision ResNet state dict (no conv1.weight / layer1.*; keys such as "
            f"{', '.join(sorted(state)[:3])})"
        )
    depth = int(name[1:])
    converted = torchvision_resnet_to_d2(state)
    reference = ResNet(
        BasicStem(in_channels=3, out_channels=64, norm="BN"), resnet_stages(depth), out_features=["res5"]
    ).state_dict()
    return _checked_conversion(converted, reference, f"detectron2's ResNet-{depth}", {"backbone": name, "depth": depth})


def _checked_conversion(converted: dict, reference: dict, label: str, conversion: dict) -> dict:
    """The checkpoint of the ``converted`` entries, checked against the ``reference`` state dict
    of the configs' backbone (``label`` in the error)."""
    missing = [k for k in reference if k not in converted and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in converted if k not in reference]
    shapes = [k for k in reference if k in converted and converted[k].shape != reference[k].shape]
    if missing or unexpected or shapes:
        from .modeling.backbone import resnet_depth

        found = resnet_depth(converted.keys())
        what = f"a ResNet-{found}" if found else "not a standard ResNet" if "ResNet" in label else "another shape"
        first = (
            f"missing {missing[0]}" if missing
            else f"unexpected {unexpected[0]}" if unexpected
            else f"{shapes[0]}: {tuple(converted[shapes[0]].shape)} vs {tuple(reference[shapes[0]].shape)}"
        )
        raise ValueError(
            f"does not match {label} ({what}; {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(shapes)} of another shape, e.g. {first})"
        )
    model = {k: converted[k].detach().clone() for k in reference if k in converted}
    return {
        "model": model,  # the backbone's names: stem.*, res2.* / layer1.*, ...
        "__author__": "torchvision",
        "matching_heuristics": True,
        "conversion": dict(conversion, entries=len(model)),
    }


def save_converted_backbone(checkpoint: dict, path: str) -> str:
    """Write :func:`convert_torchvision_backbone`'s checkpoint atomically (complete or absent)."""
    from .engine.checkpoint import _atomic_write

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _atomic_write(path, lambda f: torch.save(checkpoint, f))
    return path


class BackboneClassifier(nn.Module):
    """A detector backbone as the configs build it — detectron2's ResNet (stem with BN,
    ``resnet_stages(depth)``), MobileNetV2 or YOLOX-tiny's CSPDarknet — + global average pooling
    of its last feature + a linear classifier. ``backbone``: a ResNet depth (18 or "r18"), "mv2"
    or "csp_tiny". Input: uint8 or
    float RGB images (N, 3, H, W) in [0, 255], normalized here with the detectors' pixel
    mean/std."""

    def __init__(self, backbone="r18", num_classes: int = NUM_CROP_CLASSES, norm: str = "BN"):
        super().__init__()
        name = backbone_name(backbone)
        if name == "mv2":
            self.backbone, self.feature = MobileNetV2(out_features=["conv_last"], norm=norm), "conv_last"
        elif name == "csp_tiny":  # YOLOX-tiny's, as configs/common/models/yolox.py builds it
            self.backbone = CSPDarknet(deepen_factor=0.33, widen_factor=0.375, out_features=["stage4"], norm=norm)
            self.feature = "stage4"
        else:
            self.backbone = ResNet(
                BasicStem(in_channels=3, out_channels=64, norm=norm),
                resnet_stages(int(name[1:]), norm=norm),
                out_features=["res5"],
                freeze_at=0,
            )
            self.feature = "res5"
        self.fc = nn.Linear(self.backbone.output_shape()[self.feature].channels, num_classes)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), False)

    def forward(self, images):
        x = (images.float() - self.pixel_mean) / self.pixel_std
        return self.fc(self.backbone(x)[self.feature].mean(dim=(2, 3)))


def _crop_chunk(args):
    start, stop, seed, split, size = args
    images, labels, _ = make_crops(range(start, stop), seed=seed, split=split, size=size)
    return images, labels


def crop_set(num, *, seed=0, split="fit", size=64, num_workers=2, chunk=256):
    """Crops ``0 .. num - 1`` of the stream ``seed`` of :func:`make_crops` as tensors: uint8
    images (N, 3, size, size) and int64 labels (N,); made by ``num_workers`` processes, identical
    for any number of them."""
    jobs = [(a, min(a + chunk, num), seed, split, size) for a in range(0, num, chunk)]
    if num_workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with ctx.Pool(num_workers) as pool:
            parts = pool.map(_crop_chunk, jobs)
    else:
        parts = [_crop_chunk(job) for job in jobs]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts])).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(np.concatenate([p[1] for p in parts]))


@torch.no_grad()
def evaluate(model, images, labels, batch_size=256) -> float:
    """Top-1 accuracy (%) of ``model`` on ``images``."""
    model.eval()
    correct = sum(
        (model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
        for i in range(0, len(labels), batch_size)
    )
    model.train()
    return 100.0 * correct / max(len(labels), 1)


def pretrain_backbone(
    *,
    backbone="r18",
    num_crops: Optional[int] = None,
    epochs: Optional[int] = None,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 5e-5,
    crop_size: int = 64,
    holdout_crops: int = 2048,
    seed: int = 0,
    num_workers: int = 2,
    bf16=None,
    log_period: int = 50,
):
    """
    Train :class:`BackboneClassifier` of ``backbone`` for ``epochs`` passes over ``num_crops`` crops
    of the ``fit`` digit samples (both by default :func:`pretrain_schedule`'s; AdamW, linear
    warm-up over 10 steps then cosine decay, label smoothing 0.1), then measure top-1 on
    ``holdout_crops`` crops of the held-out digit samples.
    ``bf16``: autocast the forward pass to bfloat16 (None: where the CPU has native bfloat16
    arithmetic, about 1.8x faster there). Returns ``(classifier, info)`` with ``info`` =
    ``{"backbone", "top1_holdout", "top1_fit_last", "seconds", ...}`` (the recipe included).
    """
    name = backbone_name(backbone)
    num_crops, epochs = pretrain_schedule(name, num_crops, epochs)
    start = time.perf_counter()
    images, labels = crop_set(num_crops, seed=seed, size=crop_size, num_workers=num_workers)
    holdout = crop_set(holdout_crops, seed=seed + 1_000_003, split="holdout", size=crop_size, num_workers=num_workers)
    data_seconds = time.perf_counter() - start
    logger.info(f"pretrain {name}: {num_crops} + {holdout_crops} held-out crops made in {data_seconds:.0f} s")

    torch.manual_seed(seed)
    model = BackboneClassifier(name)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # BN and biases
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    steps_per_epoch = num_crops // batch_size
    iterations = epochs * steps_per_epoch
    warmup = min(10, iterations)

    def lr_at(it):
        if it < warmup:
            return lr * (it + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (it - warmup) / max(1, iterations - warmup)))

    if bf16 is None:
        bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    generator = torch.Generator().manual_seed(seed)
    recent = []
    model.train()
    for it in range(iterations):
        if it % steps_per_epoch == 0:
            order = torch.randperm(num_crops, generator=generator)
        batch = order[(it % steps_per_epoch) * batch_size : (it % steps_per_epoch + 1) * batch_size]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(images[batch])
        loss = F.cross_entropy(logits.float(), labels[batch], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent = (recent + [(logits.argmax(1) == labels[batch]).float().mean().item()])[-log_period:]
        if (it + 1) % log_period == 0 or it + 1 == iterations:
            elapsed = time.perf_counter() - start
            eta = (elapsed - data_seconds) / (it + 1) * (iterations - it - 1)
            logger.info(
                f"pretrain {name}: iter {it + 1}/{iterations}  loss {loss.item():.3f}  "
                f"top-1 (last {len(recent)} batches) {100 * np.mean(recent):.1f}%  "
                f"lr {lr_at(it):.5f}  {elapsed:.0f} s, eta {eta:.0f} s"
            )
    top1 = evaluate(model, *holdout)
    info = {
        "backbone": name,
        "top1_holdout": top1,
        "top1_fit_last": 100 * float(np.mean(recent)) if recent else float("nan"),
        "seconds": time.perf_counter() - start,
        "data_seconds": data_seconds,
        "num_crops": num_crops,
        "epochs": epochs,
        "iterations": iterations,
        "batch_size": batch_size,
        "crop_size": crop_size,
        "optimizer": "AdamW",
        "lr": lr,
        "weight_decay": weight_decay,
        "bf16": bool(bf16),
        "seed": seed,
        "classes": NUM_CROP_CLASSES,
        "input_format": "RGB",
        "pixel_mean": list(PIXEL_MEAN),
        "pixel_std": list(PIXEL_STD),
    }
    return model, info


def save_backbone_checkpoint(model: BackboneClassifier, info, path):
    """Write the backbone as detectron2 loads an ImageNet backbone: the backbone's own names
    (ResNet's ``stem.*``, ``res2.*``; MobileNetV2's ``stem.*``, ``layer1.*``), matched into the
    detector by detectron2's heuristics; ``info`` (backbone, accuracy, recipe) travels along."""
    from .engine.checkpoint import _atomic_write

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    data = {
        "model": model.backbone.state_dict(),  # the backbone's names: stem.*, res2.* / layer1.*, ...
        "__author__": "hqod.pretrain",
        "matching_heuristics": True,
        "pretrain": dict(info),
    }
    _atomic_write(path, lambda f: torch.save(data, f))
    return path
