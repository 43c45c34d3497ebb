"""Every file in configs/ loads; every config with a model instantiates it (and its optimizer and
LR schedule) and the model runs a forward pass; data configs resolve every interpolation."""
import glob
import os

import pytest
import torch
from omegaconf import OmegaConf

from detectron2.config import LazyConfig, instantiate
from detectron2.utils.events import EventStorage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
)


def test_there_are_configs():
    assert "configs/retina_r18_fp32.py" in CONFIGS and "configs/fcos_r18_fp32.py" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads_and_instantiates(path):
    cfg = LazyConfig.load(os.path.join(ROOT, path))
    if "dataloader" in cfg:
        for preset in ("digits", "coco", "voc"):
            cfg.dataloader.dataset = preset
            OmegaConf.to_container(cfg.dataloader, resolve=True)  # every interpolation resolves
        cfg.dataloader.dataset = "digits"
    if "model" not in cfg:
        return
    if "backbone" in cfg.model:
        cfg.model.backbone.out_channels = 32  # small and fast; the structure is what is tested
    model = instantiate(cfg.model)
    if "optimizer" in cfg:
        cfg.optimizer.params.model = model
        instantiate(cfg.optimizer)
        instantiate(cfg.lr_multiplier)
    model.eval()
    with torch.no_grad(), EventStorage():
        out = model([{"image": torch.randint(0, 255, (3, 64, 64)).float()}])
    assert "instances" in out[0]
