"""Every file in configs/ loads; every config with a model builds it (quantized when it has a
``quant`` node), its optimizer and LR schedule, and R18 models run a forward pass; data configs
resolve every interpolation; the QAT matrix is complete and each file means what its name says."""
import glob
import itertools
import os

import pytest
import torch
from omegaconf import OmegaConf

from detectron2.config import LazyConfig, instantiate
from detectron2.utils.events import EventStorage

from hqod.engine import build_model
from hqod.modeling import HQODATSS, HQODFCOS, HQODRetinaNet
from hqod.quantization import quantizers_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
)
DETS = {"retina": HQODRetinaNet, "fcos": HQODFCOS, "atss": HQODATSS}
MATRIX = [
    f"configs/{det}_{bb}_{qat}_w{bits}{hqod}.py"
    for det, bb, qat, bits, hqod in itertools.product(
        DETS, ["r18", "r50"], ["lsq", "tqt", "aqdstar", "aqd"], [2, 3, 4], ["", "_hqod"]
    )
] + [f"configs/{det}_{bb}_fp32.py" for det in DETS for bb in ["r18", "r50"]]


def test_the_matrix_is_complete():
    assert set(MATRIX) <= set(CONFIGS), sorted(set(MATRIX) - set(CONFIGS))


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads_and_builds(path):
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
    if "train" in cfg:
        model = build_model(cfg)
        cfg.optimizer.params.model = model
        instantiate(cfg.optimizer)
        instantiate(cfg.lr_multiplier)
    else:
        model = instantiate(cfg.model)

    name = os.path.basename(path)[:-3]
    parts = name.split("_")
    if len(parts) >= 3 and parts[0] in DETS:
        assert isinstance(model, DETS[parts[0]]) == name.endswith("_hqod")
        depth = {"r18": 18, "r50": 50}[parts[1]]
        assert len(model.backbone.bottom_up.res4) == {18: 2, 50: 6}[depth]
        if parts[2] == "fp32":
            assert "quant" not in cfg and not quantizers_of(model)
        else:
            bits = int(parts[3][1:])
            assert cfg.quant.weight_bits == cfg.quant.act_bits == bits
            assert cfg.train.init_checkpoint == f"output/{parts[0]}_{parts[1]}_fp32/model_final.pth"
            assert cfg.train.output_dir == f"./output/{name}"
            assert quantizers_of(model)
        if depth == 50:
            return  # R50 forward adds minutes and nothing R18 does not test
    model.eval()
    with torch.no_grad(), EventStorage():
        out = model([{"image": torch.randint(0, 255, (3, 64, 64)).float()}])
    assert "instances" in out[0]
