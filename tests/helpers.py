"""Shared by the tests that run tools/train_net.py or build detectors: the overrides of a tiny,
fast RetinaNet/FCOS (FPN width 32, 128 px images, no data-loading workers); synthetic batches
and small calibrated detectors."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name):
    """``tools/<name>.py`` imported as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_overrides(batch_size=2):
    # from scratch: tests do not depend on output/pretrained (a QAT test names its FP32
    # checkpoint after these overrides)
    return [
        'train.init_checkpoint=""',
        "model.backbone.out_channels=32",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[128]",
        "dataloader.test.mapper.augmentations.0.short_edge_length=128",
        f"dataloader.train.total_batch_size={batch_size}",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
    ]


def tiny_config(config, batch_size=4):
    """``config`` (a path under the repository root) with :func:`tiny_overrides`, on the
    ``digits_tiny_*`` datasets of the ``tiny_digits`` fixture."""
    from detectron2.config import LazyConfig

    cfg = LazyConfig.apply_overrides(LazyConfig.load(os.path.join(ROOT, config)), tiny_overrides(batch_size))
    cfg.dataloader.train.dataset.names = "digits_tiny_train"
    cfg.dataloader.test.dataset.names = "digits_tiny_val"
    return cfg


def synthetic_batches(n, size=96, seed=0, per_batch=2):
    """``n`` detectron2 batches of random images with one box each."""
    import torch
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        inst = Instances((size, size), gt_boxes=Boxes(torch.tensor([[10.0, 12.0, 60.0, 70.0]])),
                         gt_classes=torch.tensor([1]))
        yield [
            {"image": torch.rand(3, size, size, generator=g) * 255, "instances": inst, "height": size, "width": size}
            for _ in range(per_batch)
        ]


def calibrated_detector(config, quant=None):
    """The detector of ``config`` (3 classes, FPN width 32, every score kept) with BN statistics
    from two float forwards on synthetic batches, then quantized with ``quant`` (a ``quant``
    node as a dict; None: FP32) and calibrated on two images, in eval mode."""
    import torch
    from detectron2.config import LazyConfig, instantiate
    from detectron2.utils.events import EventStorage

    from hqod.quantization import calibrate, quantize_model

    torch.manual_seed(0)
    cfg = LazyConfig.load(os.path.join(ROOT, config))
    cfg.model.num_classes = 3
    cfg.model.backbone.out_channels = 32
    cfg.model.test_score_thresh = 0.0
    model = instantiate(cfg.model)
    model.train()
    with torch.no_grad(), EventStorage():
        for batch in synthetic_batches(2, seed=1):
            model(batch)
    if quant is not None:
        quantize_model(model, quant)
        calibrate(model, synthetic_batches(1, seed=2), num_images=2)
    return model.eval()
