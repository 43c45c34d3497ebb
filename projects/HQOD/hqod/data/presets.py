"""
Dataset presets: one name switches everything that depends on the dataset.

Data configs set ``dataloader.dataset = "digits"`` and read the rest through the OmegaConf resolver
``${hqod_data:<preset>,<key>}``, so COCO is one override away:
``tools/train_net.py --config-file configs/retina_r18_fp32.py dataloader.dataset=coco``.

Besides names, class count and image sizes, a preset sets the batch size and the FPN/head width
(``fpn_channels``): the papers' 256 for COCO and VOC, and 64 for the embedded dataset, whose 10
classes and small images train 3x faster that way on a 2-core CPU; and SSD-lite's input sizes,
levels and prior sizes (``ssd_*``) and YOLOX-tiny's input sizes (``yolox_*``), which are not the other
detectors'. It also sets the schedule:
``batch_size`` is the reference batch of the preset's schedules and ``train_images`` turns the
papers' epochs into iterations; the schedules themselves (FP32 and each QAT recipe) are in
:mod:`hqod.solver.schedules`, read by the configs through ``${hqod_schedule:...}``.

``backbone_checkpoint`` is where the FP32 configs' ``train.init_checkpoint`` points, through the
resolver ``${hqod_backbone:<preset>,<backbone>}`` (a ResNet depth, ``mv2`` for MobileNetV2,
``csp_tiny`` for YOLOX-tiny's CSPDarknet): for digits, the backbone that
``tools/pretrain_backbone.py --depth <depth>`` (``--backbone <name>``) trains on the embedded
data (the stand-in for ImageNet pretraining); for COCO and VOC, torchvision's ImageNet ResNet or
MobileNetV2 converted by ``tools/convert_torchvision_backbone.py --depth <depth> --input
<torchvision .pth>``, and nothing for CSPDarknet, which YOLOX trains from scratch.
"""
from omegaconf import OmegaConf

# torchvision's ImageNet ResNet in detectron2's names (tools/convert_torchvision_backbone.py)
IMAGENET_BACKBONE = "output/pretrained/imagenet_{name}.pth"

# YOLOX-tiny's sizes on real data (the HQOD authors' COCO config trains mosaics of 640 px
# randomly resized to 320-640 and tests at 416): here shortest edges 320-640 in steps of 32, the
# longest at most 640; tested at 416.
YOLOX_TINY = dict(yolox_train_sizes=list(range(320, 641, 32)), yolox_test_size=416, yolox_max_size=640)

# SSD-lite's 320-px setting (the HQOD authors' COCO config): shortest edge 320 (the longest at
# most 533, detectron2's 800:1333 ratio; they resize to 320 x 320); its six levels: MobileNetV2's
# layer5 (96 channels, stride 16) and conv_last (1280, stride 32), then four extra levels; and its
# prior sizes (the smallest 3x its level's stride).
SSDLITE_320 = dict(
    ssd_train_sizes=[320],
    ssd_test_size=320,
    ssd_max_size=533,
    ssd_in_features=["layer5", "conv_last"],
    ssd_extra_channels=[512, 256, 256, 128],
    ssd_level_channels=[96, 1280, 512, 256, 256, 128],
    ssd_strides=[16, 32, 64, 128, 256, 512],
    ssd_min_sizes=[48, 100, 150, 202, 253, 304],
    ssd_max_sizes=[100, 150, 202, 253, 304, 320],
    # SSD's training augmentation (hqod.data.ssd_augmentation), as the authors train SSD-lite:
    # each photometric change and the zoom-out with probability 0.5, the min-IoU crop always
    ssd_photometric_prob=0.5,
    ssd_expand_prob=0.5,
    ssd_crop_prob=1.0,
)

PRESETS = {
    # The embedded dataset. No flips: a mirrored digit is another shape (or another digit).
    "digits": dict(
        train="digits_train",
        test="digits_val",
        num_classes=10,
        train_sizes=[224, 256, 288],
        # tested at about the scenes' own size (256-384 px): the small digits need the pixels
        test_size=384,
        max_size=512,
        flip_prob=0.0,
        batch_size=4,
        train_images=2000,  # tools/generate_digits.py's default (the digits schedules are in iterations)
        fpn_channels=64,
        backbone_checkpoint="output/pretrained/digits_{name}.pth",
        # SSD-lite (configs/common/models/ssdlite.py) at the preset's own sizes. The digits are
        # 12-166 px, half of them under 40: COCO's levels leave 45 % of the boxes (68 % of
        # those under 24 px) without a prior of IoU >= 0.5 (BENCHMARKS.md, "Lightweight
        # detectors"), so here the first level is MobileNetV2's layer3 (32 channels, stride 8)
        # and three extra levels follow conv_last; priors about 2.5x their level's stride.
        ssd_train_sizes=[224, 256, 288],
        ssd_test_size=384,
        ssd_max_size=512,
        ssd_in_features=["layer3", "layer5", "conv_last"],
        ssd_extra_channels=[512, 256, 256],
        ssd_level_channels=[32, 96, 1280, 512, 256, 256],
        ssd_strides=[8, 16, 32, 64, 128, 256],
        ssd_min_sizes=[20, 40, 72, 120, 168, 224],
        ssd_max_sizes=[40, 72, 120, 168, 224, 288],
        # SSD's training augmentation off: its zoom-out shrinks the 12-px digits below the
        # smallest prior, and the digits schedules are far shorter than the authors' 120 epochs
        ssd_photometric_prob=0.0,
        ssd_expand_prob=0.0,
        ssd_crop_prob=0.0,
        # YOLOX-tiny (configs/common/models/yolox.py): the preset's own sizes
        yolox_train_sizes=[224, 256, 288],
        yolox_test_size=384,
        yolox_max_size=512,
    ),
    "coco": dict(
        train="coco_2017_train",
        test="coco_2017_val",
        num_classes=80,
        train_sizes=[640, 672, 704, 736, 768, 800],
        test_size=800,
        max_size=1333,
        flip_prob=0.5,
        batch_size=16,
        train_images=117266,  # train2017 images with annotations (detectron2 drops the others)
        fpn_channels=256,
        backbone_checkpoint=IMAGENET_BACKBONE,
        **SSDLITE_320,
        **YOLOX_TINY,
    ),
    "voc": dict(
        train="voc_0712_trainval_coco",
        test="voc_2007_test_coco",
        num_classes=20,
        train_sizes=[480, 512, 544, 576, 608],
        test_size=600,
        max_size=1000,
        flip_prob=0.5,
        batch_size=16,
        train_images=16551,  # VOC2007 trainval 5,011 + VOC2012 trainval 11,540
        fpn_channels=256,
        backbone_checkpoint=IMAGENET_BACKBONE,
        **SSDLITE_320,
        **YOLOX_TINY,
    ),
}


def preset_value(preset: str, key: str):
    if preset not in PRESETS:
        raise KeyError(
            f"Unknown dataset preset {preset!r} (dataloader.dataset); choose one of "
            f"{sorted(PRESETS)}, or set dataloader.train.dataset.names etc. directly."
        )
    return PRESETS[preset][key]


# Backbones named other than by a ResNet depth: MobileNetV2 (SSD-lite's), YOLOX-tiny's CSPDarknet.
NAMED_BACKBONES = ("mv2", "csp_tiny")
# Backbones their detector's authors train from scratch on real data (YOLOX): no ImageNet file.
FROM_SCRATCH_ON_REAL_DATA = ("csp_tiny",)


def backbone_name(backbone) -> str:
    """The name of a backbone in checkpoint file names: ``r<depth>`` for a ResNet (given as its
    depth, 18 or "18", or as "r18"), or one of :data:`NAMED_BACKBONES`."""
    name = str(backbone)
    if name in NAMED_BACKBONES:
        return name
    depth = name[1:] if name.startswith("r") else name
    if not depth.isdigit():
        raise ValueError(f"Unknown backbone {backbone!r}: a ResNet depth (18, 34, 50, ...) or one of {list(NAMED_BACKBONES)}.")
    return f"r{int(depth)}"


def backbone_checkpoint(preset: str, backbone) -> str:
    """The preset's pretrained checkpoint of ``backbone`` (:func:`backbone_name`); "" (from
    scratch) for a backbone of :data:`FROM_SCRATCH_ON_REAL_DATA` on a preset other than digits."""
    name = backbone_name(backbone)
    if preset != "digits" and name in FROM_SCRATCH_ON_REAL_DATA:
        return ""
    return preset_value(preset, "backbone_checkpoint").format(name=name)


if not OmegaConf.has_resolver("hqod_data"):
    OmegaConf.register_new_resolver("hqod_data", preset_value)
if not OmegaConf.has_resolver("hqod_backbone"):
    OmegaConf.register_new_resolver("hqod_backbone", backbone_checkpoint)
