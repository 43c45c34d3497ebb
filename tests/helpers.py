"""Shared by the tests that run tools/train_net.py or build detectors: the overrides of a tiny,
fast RetinaNet/FCOS (FPN width 32, 128 px images, no data-loading workers)."""
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
